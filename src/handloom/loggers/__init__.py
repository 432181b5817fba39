"""Metric loggers for ``Fabric(loggers=...)``: CSV files and TensorBoard event files.

``from handloom.loggers import CSVLogger, TensorBoardLogger, Logger``. The logger classes load on
first use (so ``import handloom`` stays fast), and TensorBoard itself only when a
``TensorBoardLogger`` first writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from handloom.loggers.base import Logger
    from handloom.loggers.csv_logs import CSVLogger
    from handloom.loggers.tensorboard import TensorBoardLogger

__all__ = ["CSVLogger", "Logger", "TensorBoardLogger"]

_LAZY = {
    "Logger": "handloom.loggers.base",
    "CSVLogger": "handloom.loggers.csv_logs",
    "TensorBoardLogger": "handloom.loggers.tensorboard",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'handloom.loggers' has no attribute {name!r}")
