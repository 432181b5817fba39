"""Run code, log and warn on global rank 0 only (``lightning.fabric.utilities.rank_zero``).

``rank_zero_only.rank`` is this process's global rank. At import it is read from the first of
``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID`` and ``JSM_NAMESPACE_RANK`` that is set (0 when none
is), as in Lightning; a :class:`~handloom.Fabric` sets it to its ``global_rank`` as soon as it
knows it (at construction, or in each process it launches). You may set it yourself.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

from typing_extensions import ParamSpec

__all__ = [
    "LightningDeprecationWarning",
    "WarningCache",
    "rank_prefixed_message",
    "rank_zero_debug",
    "rank_zero_deprecation",
    "rank_zero_info",
    "rank_zero_only",
    "rank_zero_warn",
]

_P = ParamSpec("_P")
_T = TypeVar("_T")

_log = logging.getLogger(__name__)

# Lightning's order: LOCAL_RANK before SLURM_PROCID, which SLURM sets even when it does not start
# the training processes.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def _rank_from_environment(env: Mapping[str, str]) -> int | None:
    """The first rank variable that holds an integer, or ``None`` if none is set."""
    for name in _RANK_VARIABLES:
        value = env.get(name)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    return None


def _get_rank() -> int | None:
    """This process's rank as the launch environment says, or ``None`` when nothing says it."""
    return _rank_from_environment(os.environ)


class _RankZeroOnly:
    """The ``rank_zero_only`` decorator; its ``rank`` attribute is the process's global rank."""

    def __init__(self, rank: int | None) -> None:
        self.rank = rank

    @overload
    def __call__(self, fn: Callable[_P, _T]) -> Callable[_P, _T | None]: ...

    @overload
    def __call__(self, fn: Callable[_P, _T], default: _T) -> Callable[_P, _T]: ...

    def __call__(self, fn: Callable[_P, _T], default: _T | None = None) -> Callable[_P, _T | None]:
        """Wrap ``fn`` so that it runs on global rank 0 and returns ``default`` on the other ranks.

        Args:
            fn: The function to guard.
            default: What the other ranks get back instead of ``fn``'s result.

        Raises:
            RuntimeError: (When the wrapper is called) ``rank_zero_only.rank`` was set to ``None``.
        """

        @functools.wraps(fn)
        def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> _T | None:
            rank = self.rank
            if rank is None:
                raise RuntimeError(
                    f"{getattr(fn, '__qualname__', fn)!r} is guarded by rank_zero_only, but"
                    " rank_zero_only.rank is None, so the rank of this process is unknown. Set"
                    " rank_zero_only.rank = fabric.global_rank (or create the Fabric first)."
                )
            return fn(*args, **kwargs) if rank == 0 else default

        return wrapped


rank_zero_only = _RankZeroOnly(_get_rank() or 0)
"""Decorator: ``@rank_zero_only`` or ``rank_zero_only(fn, default)``; ``rank_zero_only.rank`` is settable."""


def _follow_rank(rank: int) -> None:
    """Make ``rank_zero_only`` (and lightning_utilities' one, if something imported it) use ``rank``."""
    rank_zero_only.rank = rank
    # Libraries built on lightning_utilities (torchmetrics, for one) read its own flag, which
    # Lightning's strategies set alongside theirs.
    other = sys.modules.get("lightning_utilities.core.rank_zero")
    if other is not None and hasattr(other, "rank_zero_only"):
        other.rank_zero_only.rank = rank


class LightningDeprecationWarning(DeprecationWarning):
    """The category of :func:`rank_zero_deprecation` warnings (Lightning's name, for filters)."""


def _debug(*args: Any, stacklevel: int = 2, **kwargs: Any) -> None:
    _log.debug(*args, stacklevel=stacklevel, **kwargs)


@rank_zero_only
def rank_zero_debug(*args: Any, stacklevel: int = 4, **kwargs: Any) -> None:
    """Log at DEBUG level (logger ``handloom.utilities.rank_zero``) on global rank 0 only."""
    _debug(*args, stacklevel=stacklevel, **kwargs)


def _info(*args: Any, stacklevel: int = 2, **kwargs: Any) -> None:
    _log.info(*args, stacklevel=stacklevel, **kwargs)


@rank_zero_only
def rank_zero_info(*args: Any, stacklevel: int = 4, **kwargs: Any) -> None:
    """Log at INFO level (logger ``handloom.utilities.rank_zero``) on global rank 0 only."""
    _info(*args, stacklevel=stacklevel, **kwargs)


def _warn(message: str | Warning, stacklevel: int = 2, **kwargs: Any) -> None:
    warnings.warn(message, stacklevel=stacklevel, **kwargs)


@rank_zero_only
def rank_zero_warn(message: str | Warning, stacklevel: int = 4, **kwargs: Any) -> None:
    """``warnings.warn(message, **kwargs)`` on global rank 0 only.

    The default ``stacklevel`` points at the line that called ``rank_zero_warn``.
    """
    _warn(message, stacklevel=stacklevel, **kwargs)


def rank_zero_deprecation(message: str | Warning, stacklevel: int = 5, **kwargs: Any) -> None:
    """Warn with :class:`LightningDeprecationWarning` (or ``category=``) on global rank 0 only."""
    category = kwargs.pop("category", LightningDeprecationWarning)
    rank_zero_warn(message, stacklevel=stacklevel, category=category, **kwargs)


def rank_prefixed_message(message: str, rank: int | None) -> str:
    """``"[rank: R] message"``, or ``message`` unchanged when ``rank`` is ``None``."""
    return message if rank is None else f"[rank: {rank}] {message}"


class WarningCache(set[str]):
    """Messages already shown: each method shows a given message once (on global rank 0)."""

    def warn(self, message: str, stacklevel: int = 5, **kwargs: Any) -> None:
        """:func:`rank_zero_warn` the first time ``message`` comes."""
        if message not in self:
            self.add(message)
            rank_zero_warn(message, stacklevel=stacklevel, **kwargs)

    def deprecation(self, message: str, stacklevel: int = 6, **kwargs: Any) -> None:
        """:func:`rank_zero_deprecation` the first time ``message`` comes."""
        if message not in self:
            self.add(message)
            rank_zero_deprecation(message, stacklevel=stacklevel, **kwargs)

    def info(self, message: str, stacklevel: int = 5, **kwargs: Any) -> None:
        """:func:`rank_zero_info` the first time ``message`` comes."""
        if message not in self:
            self.add(message)
            rank_zero_info(message, stacklevel=stacklevel, **kwargs)
