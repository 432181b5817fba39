"""Distributed strategies: ``from handloom.strategies import DDPStrategy, FSDPStrategy``."""

from handloom.strategies.base import Runtime, Strategy
from handloom.strategies.ddp import DDPStrategy
from handloom.strategies.dp import DataParallelStrategy
from handloom.strategies.fsdp import FSDPStrategy
from handloom.strategies.model_parallel import ModelParallelStrategy
from handloom.strategies.single_device import SingleDeviceStrategy

__all__ = [
    "DDPStrategy",
    "DataParallelStrategy",
    "FSDPStrategy",
    "ModelParallelStrategy",
    "Runtime",
    "SingleDeviceStrategy",
    "Strategy",
]
