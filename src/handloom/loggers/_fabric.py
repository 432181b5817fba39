"""What ``Fabric`` does with its loggers: check them, tell them the rank, agree on versions, log."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from handloom.apply import apply_to_tensors
from handloom.loggers.base import _FileLogger, hold_until_exit
from handloom.validation import describe


class NoLoggerError(RuntimeError, IndexError):
    """``fabric.logger`` with no logger (an ``IndexError`` too, as Lightning raises one)."""


def check_loggers(loggers: list[Any]) -> list[Any]:
    """Return ``loggers`` after checking each has ``log_metrics``; all are finalised at exit.

    Raises:
        TypeError: A logger without a callable ``log_metrics``.
    """
    for logger in loggers:
        if not callable(getattr(logger, "log_metrics", None)):
            raise TypeError(
                f"Fabric(loggers=...) got {describe(logger)} (type {type(logger).__name__}), which has no"
                " log_metrics(metrics, step) method. Pass handloom.loggers.CSVLogger / TensorBoardLogger"
                " objects, or objects with that method."
            )
    for logger in loggers:
        if not isinstance(logger, _FileLogger) and callable(getattr(logger, "finalize", None)):
            hold_until_exit(logger)  # ours hold themselves while they have something to write
    return loggers


def bind_rank(loggers: list[Any], global_rank: int) -> None:
    """Tell handloom's loggers this process's rank (only rank 0 writes)."""
    for logger in loggers:
        if isinstance(logger, _FileLogger):
            logger._global_rank = global_rank


def agree_on_versions(loggers: list[Any], global_rank: int, broadcast: Callable[[Any, int], Any]) -> None:
    """Make every rank use rank 0's versions (rank 0 picks and reserves the directories).

    Every rank must call this at the same point, even one without loggers: it is a collective.
    """
    ours = [logger for logger in loggers if isinstance(logger, _FileLogger)]
    versions = [logger.version for logger in ours] if global_rank == 0 else None
    versions = broadcast(versions, 0)
    for logger, version in zip(ours, versions, strict=False):
        logger._version = version


def flush(loggers: list[Any]) -> None:
    """Write what handloom's loggers buffered (before worker processes start with copies of them)."""
    for logger in loggers:
        if isinstance(logger, _FileLogger):
            logger.save()


def check_metrics(metrics: Mapping[str, Any]) -> None:
    """Reject a tensor of more than one element, naming its key (no device sync: ``numel`` is metadata).

    Raises:
        ValueError: A tensor with more than one element.
    """
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            check_metrics(value)
        elif isinstance(value, torch.Tensor) and value.numel() != 1:
            raise ValueError(
                f"fabric.log / fabric.log_dict got a tensor of shape {tuple(value.shape)} for {key!r}; a"
                f" metric is one number. Log a reduction such as {key}.mean(), or one key per element."
            )


def log_to_all(loggers: list[Any], metrics: Mapping[str, Any], step: int | None) -> None:
    """Send ``metrics`` to every logger: tensors as they are to handloom's (converted at their flush),
    as Python numbers (``.item()``, one sync each) to loggers of other libraries.

    Both arguments go by keyword, ``log_metrics(metrics=..., step=...)``, as Lightning passes them:
    loggers written for it may declare them in another order or keyword-only.
    """
    plain: Any = None
    for logger in loggers:
        if isinstance(logger, _FileLogger):
            logger.log_metrics(metrics=metrics, step=step)
            continue
        if plain is None:
            plain = apply_to_tensors(dict(metrics), lambda t: t.item())
        logger.log_metrics(metrics=plain, step=step)
