"""Strategy names accepted by ``Fabric(strategy=...)``: ``STRATEGY_REGISTRY``, with Lightning's API.

``STRATEGY_REGISTRY.register("mine", MyStrategy, some_option=1)`` makes ``Fabric(strategy="mine")``
build ``MyStrategy(some_option=1)``.
"""

from __future__ import annotations

from typing import Any

from handloom.accelerators.registry import _NamedRegistry
from handloom.strategies.base import Strategy
from handloom.strategies.ddp import DDPStrategy
from handloom.strategies.dp import DataParallelStrategy
from handloom.strategies.single_device import SingleDeviceStrategy


class _StrategyRegistry(_NamedRegistry):
    """Strategy names mapped to a class and the keyword arguments it is built with."""

    kind = "strategy"

    def available_strategies(self) -> list[str]:
        """The registered names."""
        return list(self)


# The strategies below load on first use, so `import handloom` stays fast for DDP users.
def _fsdp(**kwargs: Any) -> Strategy:
    from handloom.strategies.fsdp import FSDPStrategy

    return FSDPStrategy(**kwargs)


def _deepspeed(**kwargs: Any) -> Strategy:
    from handloom.strategies.deepspeed import DeepSpeedStrategy

    return DeepSpeedStrategy(**kwargs)


def _xla(**kwargs: Any) -> Strategy:
    from handloom.strategies.xla import XLAStrategy

    return XLAStrategy(**kwargs)


def _single_xla(**kwargs: Any) -> Strategy:
    from handloom.strategies.single_xla import SingleDeviceXLAStrategy

    return SingleDeviceXLAStrategy(**kwargs)


def _xla_fsdp(**kwargs: Any) -> Strategy:
    from handloom.strategies.xla_fsdp import XLAFSDPStrategy

    return XLAFSDPStrategy(**kwargs)


STRATEGY_REGISTRY = _StrategyRegistry()
_register = STRATEGY_REGISTRY.register
_register("single_device", SingleDeviceStrategy, description="One process on one device")
_register("ddp", DDPStrategy, description="DDP, the script re-run per process", start_method="popen")
_register("ddp_spawn", DDPStrategy, description="DDP, launch(fn) in spawned processes", start_method="spawn")
_register("ddp_fork", DDPStrategy, description="DDP, launch(fn) in forked processes", start_method="fork")
_register("ddp_notebook", DDPStrategy, description="DDP in a notebook (forked)", start_method="fork")
_register(
    "ddp_find_unused_parameters_true",
    DDPStrategy,
    description="DDP with find_unused_parameters=True",
    start_method="popen",
    find_unused_parameters=True,
)
_register("dp", DataParallelStrategy, description="torch.nn.DataParallel")
_register("fsdp", _fsdp, description="FSDP2 (fully_shard)")
_register("fsdp_cpu_offload", _fsdp, description="FSDP2 with CPU offload", cpu_offload=True)
# DeepSpeed and XLA names exist as in Lightning; building them raises an error naming the handloom
# equivalent (handloom.strategies.deepspeed / xla).
_register("deepspeed", _deepspeed, description="DeepSpeed (not supported: see FSDPStrategy)")
for _stage in (1, 2, 3):
    _register(f"deepspeed_stage_{_stage}", _deepspeed, description="DeepSpeed ZeRO", stage=_stage)
    _offload: dict[str, Any] = {"offload_optimizer": True}
    if _stage == 3:
        _offload["offload_parameters"] = True
    _register(
        f"deepspeed_stage_{_stage}_offload",
        _deepspeed,
        description="DeepSpeed ZeRO, offload",
        stage=_stage,
        **_offload,
    )
_register(
    "deepspeed_stage_3_offload_nvme",
    _deepspeed,
    description="DeepSpeed ZeRO 3, NVMe offload",
    stage=3,
    offload_optimizer=True,
    offload_parameters=True,
    remote_device="nvme",
    offload_params_device="nvme",
    offload_optimizer_device="nvme",
)
_register("xla", _xla, description="XLA (not supported)")
_register("single_xla", _single_xla, description="XLA, one device (not supported)")
_register("xla_fsdp", _xla_fsdp, description="XLA FSDP (not supported)")


_REFUSED_FACTORIES = (_deepspeed, _xla, _single_xla, _xla_fsdp)


def strategy_names(runnable_only: bool = False) -> tuple[str, ...]:
    """Every registered strategy name; with ``runnable_only``, without the DeepSpeed and XLA names
    (which exist for Lightning's programs but raise when built)."""
    if not runnable_only:
        return tuple(STRATEGY_REGISTRY)
    return tuple(
        name for name, entry in STRATEGY_REGISTRY.items() if entry["strategy"] not in _REFUSED_FACTORIES
    )


def build_strategy(name: str) -> Strategy:
    """Build a fresh strategy for a registered ``name`` (the caller validated it).

    Raises:
        TypeError: The registered factory did not return a Strategy.
        ValueError: The name stands for a strategy handloom does not support (DeepSpeed).
        RuntimeError: The name stands for an XLA strategy.
    """
    try:
        strategy = STRATEGY_REGISTRY.get(name)
    except (ValueError, RuntimeError) as error:
        # A name that cannot run here (DeepSpeed, XLA) is refused quoting what the user wrote.
        given = getattr(error, "given", None)
        if not isinstance(given, str):
            raise
        raise type(error)(str(error).replace(given, f"Fabric(strategy={name!r})", 1)) from None
    if not isinstance(strategy, Strategy):
        raise TypeError(
            f"Fabric(strategy={name!r}) built {type(strategy).__name__}, which is not a handloom Strategy."
            " Register a subclass of handloom.strategies.Strategy."
        )
    strategy.name = name
    return strategy
