"""Strategy names accepted by ``Fabric(strategy=...)``."""

from __future__ import annotations

from collections.abc import Callable

from handloom.strategies.base import Strategy
from handloom.strategies.ddp import DDPStrategy
from handloom.strategies.dp import DataParallelStrategy
from handloom.strategies.single_device import SingleDeviceStrategy


def _fsdp(cpu_offload: bool = False) -> Strategy:
    from handloom.strategies.fsdp import FSDPStrategy  # loaded on first use: keeps the import fast

    return FSDPStrategy(cpu_offload=cpu_offload)


_REGISTRY: dict[str, Callable[[], Strategy]] = {
    "single_device": SingleDeviceStrategy,
    "ddp": lambda: DDPStrategy(start_method="popen"),
    "ddp_spawn": lambda: DDPStrategy(start_method="spawn"),
    "ddp_fork": lambda: DDPStrategy(start_method="fork"),
    "ddp_notebook": lambda: DDPStrategy(start_method="fork"),
    "ddp_find_unused_parameters_true": lambda: DDPStrategy(start_method="popen", find_unused_parameters=True),
    "dp": DataParallelStrategy,
    "fsdp": _fsdp,
    "fsdp_cpu_offload": lambda: _fsdp(cpu_offload=True),
}


def strategy_names() -> tuple[str, ...]:
    """Every registered strategy name."""
    return tuple(_REGISTRY)


def build_strategy(name: str) -> Strategy:
    """Build a fresh strategy for a registered ``name`` (the caller validated it)."""
    strategy = _REGISTRY[name]()
    strategy.name = name
    return strategy
