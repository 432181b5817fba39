"""Metric loggers for ``Fabric(loggers=...)``: CSV files and TensorBoard event files.

``from handloom.loggers import CSVLogger, TensorBoardLogger, Logger``. TensorBoard itself is
imported only when a ``TensorBoardLogger`` first writes.
"""

from __future__ import annotations

from handloom.loggers.base import Logger
from handloom.loggers.csv_logs import CSVLogger
from handloom.loggers.tensorboard import TensorBoardLogger

__all__ = ["CSVLogger", "Logger", "TensorBoardLogger"]
