"""``lightning.fabric.utilities.exceptions``."""

from __future__ import annotations

__all__ = ["MisconfigurationException"]


class MisconfigurationException(Exception):
    """Lightning's error for options that do not fit together (kept so ``except`` clauses work)."""
