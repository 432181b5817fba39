"""Fully sharded data parallel training on FSDP2 (``torch.distributed.fsdp.fully_shard``)."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from handloom.sharding import layout as layouts
from handloom.sharding.policy import resolve_module_policy
from handloom.strategies.base import Runtime
from handloom.strategies.parallel import DEFAULT_SAVE_TIMEOUT, DEFAULT_TIMEOUT
from handloom.strategies.sharded import ShardedStrategy

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from handloom.accelerators import Accelerator
    from handloom.devices import AcceleratorName, HardwareProbe
    from handloom.environments import ClusterEnvironment
    from handloom.plugins.precision import Precision
    from handloom.precision import PrecisionPolicy

# Options fully_shard takes that FSDPStrategy sets itself from its own arguments.
_MANAGED = frozenset({"module", "mesh", "mp_policy", "offload_policy"})


def _fully_shard_options() -> frozenset[str]:
    from torch.distributed.fsdp import fully_shard

    return frozenset(inspect.signature(fully_shard).parameters) - _MANAGED


class FSDPStrategy(ShardedStrategy):
    """Shard parameters, gradients and optimizer state across processes with FSDP2.

    Runs on CUDA (NCCL) and on the CPU (gloo). The options follow Lightning's ``FSDPStrategy``.

    Args:
        accelerator: An :class:`~handloom.accelerators.Accelerator` (Lightning's argument).
        parallel_devices: The devices of this node's processes (Lightning's argument).
        cluster_environment: The cluster environment to use instead of auto-detection.
        precision: A precision plugin (Lightning's argument).
        auto_wrap_policy: Which submodules become their own FSDP unit (gathered and freed on
            their own): a set of module classes such as ``{nn.TransformerDecoderLayer}``, or a
            callable ``module -> bool`` (FSDP1 policies such as ``ModuleWrapPolicy`` work too).
            The root module is always sharded last.
        activation_checkpointing: Deprecated (as in Lightning): a module class or a list of them;
            use ``activation_checkpointing_policy``.
        activation_checkpointing_policy: Submodules whose activations are recomputed in backward
            (same forms).
        cpu_offload: Keep sharded parameters, gradients and optimizer state in CPU memory
            (FSDP2's ``CPUOffloadPolicy``). On the CPU accelerator this changes nothing.
        mixed_precision: A ``torch.distributed.fsdp.MixedPrecisionPolicy`` that overrides the one
            derived from ``Fabric(precision=...)``.
        sharding_strategy: ``"FULL_SHARD"`` (default), ``"SHARD_GRAD_OP"`` (keep gathered
            parameters from forward to backward), ``"NO_SHARD"`` (replicate, like DDP),
            ``"HYBRID_SHARD"`` (shard within a node, replicate across nodes), or the
            ``ShardingStrategy`` enum.
        state_dict_type: ``"sharded"`` (default; a checkpoint directory every rank writes, loadable
            on another process count) or ``"full"`` (one file for ``torch.load``).
        device_mesh: ``(replicate, shard)`` sizes, or a ``DeviceMesh``, for hybrid sharding.
        process_group_backend: ``"nccl"``, ``"gloo"``, ...
        timeout: How long a collective may wait for the other ranks.
        save_timeout: How long ``fabric.save`` waits for every rank to call it (it is collective
            here) before it raises an error naming the ranks that did not; default 15 s.
        start_method: How handloom starts processes: ``"popen"`` (re-run the script, default),
            ``"spawn"`` or ``"fork"`` (run ``fabric.launch(fn)``).
        check_collectives: Check every collective across ranks (torch's ``DETAIL`` debug level),
            so one that some ranks never reach names them; for debugging hangs (see DDPStrategy).
        **kwargs: Passed to ``fully_shard`` (``reshard_after_forward``, ``shard_placement_fn``, ...).
            FSDP1-only options (``limit_all_gathers``, ``use_orig_params``, ...) are accepted and ignored.

    Raises:
        ValueError: An unknown sharding strategy or state-dict type, or a bad mesh shape.
        TypeError: A policy that is neither module classes nor a callable, or an unknown option.

    Example::

        strategy = FSDPStrategy(auto_wrap_policy={nn.TransformerDecoderLayer})
        fabric = Fabric(devices=4, strategy=strategy, precision="bf16-mixed")
    """

    name = "fsdp"
    wraps_forward = True
    supported_precisions = ("32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed")
    fp16_mixed_falls_back_on_cpu = False

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        precision: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = DEFAULT_TIMEOUT,
        cpu_offload: bool | Any = False,
        mixed_precision: Any = None,
        auto_wrap_policy: Any = None,
        activation_checkpointing: type[torch.nn.Module] | list[type[torch.nn.Module]] | None = None,
        activation_checkpointing_policy: Any = None,
        sharding_strategy: Any = "FULL_SHARD",
        state_dict_type: str = "sharded",
        device_mesh: tuple[int, int] | DeviceMesh | None = None,
        start_method: str = "popen",
        save_timeout: timedelta = DEFAULT_SAVE_TIMEOUT,
        check_collectives: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            layouts.resolve_state_dict_type(state_dict_type),
            process_group_backend,
            timeout,
            start_method,
            save_timeout,
            check_collectives,
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            precision=precision,
        )
        owner = type(self).__name__
        if activation_checkpointing is not None:
            activation_checkpointing_policy = _legacy_checkpointing_policy(
                activation_checkpointing, activation_checkpointing_policy
            )
        self.auto_wrap_policy = resolve_module_policy(
            auto_wrap_policy, owner=owner, option="auto_wrap_policy"
        )
        self.activation_checkpointing_policy = resolve_module_policy(
            activation_checkpointing_policy, owner=owner, option="activation_checkpointing_policy"
        )
        self.sharding_strategy = layouts.resolve_sharding_strategy(sharding_strategy)
        self._mesh_shape = layouts.check_mesh_shape(device_mesh)
        self._given_mesh: DeviceMesh | None = None
        if self._mesh_shape is None and device_mesh is not None:
            if not _is_device_mesh(device_mesh):
                raise TypeError(
                    f"FSDPStrategy(device_mesh={device_mesh!r}) must be a (replicate, shard) pair or a"
                    " torch DeviceMesh."
                )
            self._given_mesh = device_mesh  # type: ignore[assignment]
        if mixed_precision is not None and not _is_mp_policy(mixed_precision):
            raise TypeError(
                f"FSDPStrategy(mixed_precision={mixed_precision!r}) must be a"
                " torch.distributed.fsdp.MixedPrecisionPolicy, or None to follow Fabric(precision=...)."
            )
        self.mixed_precision = mixed_precision
        self.cpu_offload = cpu_offload
        self.fully_shard_kwargs, ignored = layouts.split_fsdp_kwargs(kwargs, _fully_shard_options())
        if ignored:
            warnings.warn(
                f"FSDPStrategy ignores {', '.join(ignored)}: these FSDP1 options have no FSDP2 counterpart.",
                stacklevel=2,
            )
        self._mesh: DeviceMesh | None = None

    @override
    def check_compatible(
        self, *, accelerator: AcceleratorName, world_size: int, probe: HardwareProbe
    ) -> None:
        super().check_compatible(accelerator=accelerator, world_size=world_size, probe=probe)
        if self._mesh_shape is not None:
            layouts.resolve_layout(self.sharding_strategy, self._mesh_shape, world_size, 1)

    @override
    def precision_plugin_for(self, policy: PrecisionPolicy, device_type: str) -> Precision:
        from handloom.plugins.precision import FSDPPrecision

        return FSDPPrecision(policy.name)  # bind() gives it the device type

    @override
    def bind(self, runtime: Runtime) -> None:
        super().bind(runtime)
        bind_device = getattr(self.amp, "_bind_device", None)
        if callable(bind_device):  # an FSDPPrecision (the named one or a user's) learns its device here
            bind_device(runtime.device.type)

    @property
    def layout(self) -> layouts.ShardingLayout:
        """The mesh shape and resharding behaviour this strategy uses."""
        return layouts.resolve_layout(
            self.sharding_strategy, self._mesh_shape, self.world_size, self.runtime.num_nodes
        )

    @property
    def device_mesh(self) -> DeviceMesh:
        """The device mesh parameters are sharded over (created on first use, after launch)."""
        if self._mesh is None:
            if self._given_mesh is not None:
                self._mesh = self._given_mesh
            else:
                from torch.distributed.device_mesh import init_device_mesh

                shape = self.layout
                self._mesh = init_device_mesh(
                    self.root_device.type, shape.mesh_shape, mesh_dim_names=shape.mesh_dim_names
                )
        return self._mesh

    def _shard_kwargs(self) -> dict[str, Any]:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

        from handloom.sharding.precision import mixed_precision_policy

        chosen = getattr(self.amp, "mixed_precision_config", None)
        policy = chosen if chosen is not None else mixed_precision_policy(self.runtime.precision)
        kwargs: dict[str, Any] = {
            "mesh": self.device_mesh,
            "reshard_after_forward": self.layout.reshard_after_forward,
            "mp_policy": self.mixed_precision or policy,
        }
        if isinstance(self.cpu_offload, OffloadPolicy):
            kwargs["offload_policy"] = self.cpu_offload
        elif self.cpu_offload and self.root_device.type != "cpu":
            kwargs["offload_policy"] = CPUOffloadPolicy()
        kwargs.update(self.fully_shard_kwargs)
        return kwargs

    @override
    def _shard(self, module: torch.nn.Module, compiler: Callable[..., Any] | None) -> torch.nn.Module:
        from torch.distributed.fsdp import FSDPModule

        from handloom.sharding.apply import apply_activation_checkpointing, compile_blocks, shard_model

        if self.activation_checkpointing_policy is not None:
            apply_activation_checkpointing(module, self.activation_checkpointing_policy)
        kwargs = self._shard_kwargs()
        if compiler is not None:
            from handloom.sharding.policy import select_modules

            blocks = (
                select_modules(module, self.auto_wrap_policy, include_root=False)
                if self.auto_wrap_policy
                else []
            )
            compile_blocks(blocks or [module], compiler)
        shard_model(module, self.auto_wrap_policy, kwargs)
        assert isinstance(module, FSDPModule)
        return module


def _legacy_checkpointing_policy(
    classes: type[torch.nn.Module] | list[type[torch.nn.Module]], policy: object
) -> set[type[torch.nn.Module]]:
    """Lightning's deprecated ``activation_checkpointing`` (a class or a list of them) as a policy set.

    Raises:
        ValueError: ``activation_checkpointing_policy`` was given too.
    """
    listed = set(classes) if isinstance(classes, (list, tuple, set)) else {classes}
    if policy is not None:
        raise ValueError(
            "FSDPStrategy(activation_checkpointing=..., activation_checkpointing_policy=...) sets the same"
            " thing twice. Pass only activation_checkpointing_policy."
        )
    names = ", ".join(sorted(c.__name__ for c in listed))
    warnings.warn(
        f"FSDPStrategy(activation_checkpointing=...) is deprecated, as in Lightning."
        f" Pass activation_checkpointing_policy={{{names}}} instead.",
        DeprecationWarning,
        stacklevel=3,
    )
    return listed


def _is_device_mesh(value: object) -> bool:
    from torch.distributed.device_mesh import DeviceMesh

    return isinstance(value, DeviceMesh)


def _is_mp_policy(value: object) -> bool:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return isinstance(value, MixedPrecisionPolicy)
