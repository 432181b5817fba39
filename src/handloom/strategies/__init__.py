"""Distributed strategies: ``from handloom.strategies import DDPStrategy, FSDPStrategy``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from handloom.strategies.base import Runtime, Strategy
from handloom.strategies.ddp import DDPStrategy
from handloom.strategies.dp import DataParallelStrategy
from handloom.strategies.single_device import SingleDeviceStrategy

if TYPE_CHECKING:
    from handloom.strategies.fsdp import FSDPStrategy
    from handloom.strategies.model_parallel import ModelParallelStrategy

__all__ = [
    "DDPStrategy",
    "DataParallelStrategy",
    "FSDPStrategy",
    "ModelParallelStrategy",
    "Runtime",
    "SingleDeviceStrategy",
    "Strategy",
]

# The sharded strategies load on first use, so `import handloom` stays fast for DDP users.
_LAZY = {
    "FSDPStrategy": "handloom.strategies.fsdp",
    "ModelParallelStrategy": "handloom.strategies.model_parallel",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'handloom.strategies' has no attribute {name!r}")
