"""``lightning.fabric.loggers.logger``: the :class:`Logger` base class and :func:`rank_zero_experiment`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from handloom.loggers.base import Logger
from handloom.loggers.base import _NoOpExperiment as _DummyExperiment

__all__ = ["Logger", "rank_zero_experiment"]

_L = TypeVar("_L")


def rank_zero_experiment(fn: Callable[[_L], Any]) -> Callable[[_L], Any]:
    """Decorate a logger's ``experiment`` getter: global rank 0 gets the real writer, other ranks
    an object on which every call does nothing.

    The rank is ``rank_zero_only.rank`` (:mod:`handloom.utilities.rank_zero`), which a Fabric sets.

    Example::

        class MyLogger(Logger):
            @property
            @rank_zero_experiment
            def experiment(self) -> Writer:
                return self._writer
    """

    @functools.wraps(fn)
    def experiment(self: _L) -> Any:
        from handloom.utilities.rank_zero import rank_zero_only

        if (rank_zero_only.rank or 0) > 0:
            return _DummyExperiment()
        return fn(self)

    return experiment
