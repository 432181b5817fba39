"""Warning categories (``lightning.fabric.utilities.warnings``).

Unlike Lightning, importing this module changes no global warning settings
(``warnings.formatwarning`` and the filters stay as they are).
"""

from __future__ import annotations

import warnings

from handloom.utilities.rank_zero import LightningDeprecationWarning

__all__ = ["LightningDeprecationWarning", "PossibleUserWarning", "disable_possible_user_warnings"]


class PossibleUserWarning(UserWarning):
    """A warning about something that may be a mistake, or may be what you meant."""


def disable_possible_user_warnings(module: str = "") -> None:
    """Ignore :class:`PossibleUserWarning` warnings (from every module, or those matching ``module``).

    Args:
        module: A regular expression for the module names whose warnings to ignore, e.g.
            ``"handloom.strategies"``; the default ignores them everywhere.
    """
    warnings.filterwarnings("ignore", category=PossibleUserWarning, module=module)
