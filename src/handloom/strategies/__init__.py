"""Distributed strategies: ``from handloom.strategies import DDPStrategy, FSDPStrategy``.

The names and the registry follow Lightning's ``lightning.fabric.strategies``; DeepSpeed and the
XLA strategies exist but raise an error naming the handloom equivalent when created.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from handloom.strategies.base import Runtime, Strategy
from handloom.strategies.ddp import DDPStrategy
from handloom.strategies.dp import DataParallelStrategy
from handloom.strategies.parallel import ParallelStrategy
from handloom.strategies.registry import STRATEGY_REGISTRY
from handloom.strategies.single_device import SingleDeviceStrategy

if TYPE_CHECKING:
    from handloom.strategies.deepspeed import DeepSpeedStrategy
    from handloom.strategies.fsdp import FSDPStrategy
    from handloom.strategies.model_parallel import ModelParallelStrategy
    from handloom.strategies.single_xla import SingleDeviceXLAStrategy
    from handloom.strategies.xla import XLAStrategy
    from handloom.strategies.xla_fsdp import XLAFSDPStrategy

__all__ = [
    "STRATEGY_REGISTRY",
    "DDPStrategy",
    "DataParallelStrategy",
    "DeepSpeedStrategy",
    "FSDPStrategy",
    "ModelParallelStrategy",
    "ParallelStrategy",
    "Runtime",
    "SingleDeviceStrategy",
    "SingleDeviceXLAStrategy",
    "Strategy",
    "XLAFSDPStrategy",
    "XLAStrategy",
]

# These load on first use, so `import handloom` stays fast for DDP users.
_LAZY = {
    "DeepSpeedStrategy": "handloom.strategies.deepspeed",
    "FSDPStrategy": "handloom.strategies.fsdp",
    "ModelParallelStrategy": "handloom.strategies.model_parallel",
    "SingleDeviceXLAStrategy": "handloom.strategies.single_xla",
    "XLAStrategy": "handloom.strategies.xla",
    "XLAFSDPStrategy": "handloom.strategies.xla_fsdp",
}


def __getattr__(name: str) -> Any:
    if name == "SingleTPUStrategy":  # Lightning's deprecated name for SingleDeviceXLAStrategy
        name = "SingleDeviceXLAStrategy"
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'handloom.strategies' has no attribute {name!r}")
