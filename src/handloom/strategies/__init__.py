"""Distributed strategies: ``from handloom.strategies import DDPStrategy``."""

from handloom.strategies.base import Runtime, Strategy
from handloom.strategies.ddp import DDPStrategy
from handloom.strategies.dp import DataParallelStrategy
from handloom.strategies.single_device import SingleDeviceStrategy

__all__ = ["DDPStrategy", "DataParallelStrategy", "Runtime", "SingleDeviceStrategy", "Strategy"]
