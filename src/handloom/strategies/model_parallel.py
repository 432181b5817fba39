"""Tensor parallelism plus FSDP2 on a named 2-D device mesh, arranged by the user's ``parallelize_fn``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from handloom.strategies.parallel import DEFAULT_SAVE_TIMEOUT, DEFAULT_TIMEOUT
from handloom.strategies.sharded import ShardedStrategy

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from handloom.devices import AcceleratorName, HardwareProbe

DATA_PARALLEL = "data_parallel"
TENSOR_PARALLEL = "tensor_parallel"


def _check_size(value: object, option: str) -> int | None:
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ModelParallelStrategy({option}={value!r}) must be a positive integer or 'auto'.")
    return value


def resolve_mesh_sizes(
    data_parallel_size: int | None, tensor_parallel_size: int | None, world_size: int, num_nodes: int
) -> tuple[int, int]:
    """``(data_parallel, tensor_parallel)`` sizes; ``"auto"`` (None) means nodes x devices per node.

    Raises:
        ValueError: The sizes do not multiply to ``world_size``.
    """
    per_node = max(1, world_size // max(1, num_nodes))
    dp = data_parallel_size
    tp = tensor_parallel_size
    if dp is None and tp is None:
        dp, tp = world_size // per_node, per_node
    elif dp is None:
        assert tp is not None
        dp = world_size // tp if world_size % tp == 0 else 0
    elif tp is None:
        tp = world_size // dp if world_size % dp == 0 else 0
    if dp * tp != world_size or dp == 0 or tp == 0:
        raise ValueError(
            f"ModelParallelStrategy(data_parallel_size={data_parallel_size or 'auto'!r},"
            f" tensor_parallel_size={tensor_parallel_size or 'auto'!r}) does not fit {world_size} processes:"
            " data_parallel_size x tensor_parallel_size must equal the number of processes."
        )
    return dp, tp


class ModelParallelStrategy(ShardedStrategy):
    """Tensor parallelism and FSDP2 combined on a ``("data_parallel", "tensor_parallel")`` device mesh.

    handloom builds the mesh and calls ``parallelize_fn(model, device_mesh)``, in which you apply
    ``parallelize_module`` on ``device_mesh["tensor_parallel"]`` and ``fully_shard`` on
    ``device_mesh["data_parallel"]``. Data is sharded along the data-parallel axis only: the
    processes of one tensor-parallel group see the same batches, by construction (a shuffled
    loader gets a seeded ``DistributedSampler`` even when the data-parallel size is 1).

    Args:
        parallelize_fn: ``(model, device_mesh) -> model``.
        data_parallel_size: Size of the data-parallel axis; ``"auto"`` is the number of nodes.
        tensor_parallel_size: Size of the tensor-parallel axis; ``"auto"`` is devices per node.
        save_distributed_checkpoint: ``True`` writes a sharded checkpoint directory, ``False`` one
            full file.
        process_group_backend: ``"nccl"``, ``"gloo"``, ...
        timeout: How long a collective may wait for the other ranks.
        save_timeout: How long ``fabric.save`` waits for every rank to call it (it is collective
            here) before it raises an error naming the ranks that did not; default 15 s.
        start_method: ``"popen"`` (default), ``"spawn"`` or ``"fork"``.
        check_collectives: Check every collective across ranks (torch's ``DETAIL`` debug level),
            so one that some ranks never reach names them; for debugging hangs (see DDPStrategy).

    Raises:
        TypeError: ``parallelize_fn`` is not callable.
        ValueError: A size that is not a positive integer or ``"auto"``, or sizes that do not
            multiply to the number of processes.
    """

    name = "model_parallel"
    # Lightning's set: fp16 autocast needs a gradient scaler, which tensor-parallel DTensors lack.
    supported_precisions = ("32-true", "bf16-mixed", "bf16-true", "16-true")

    def __init__(
        self,
        parallelize_fn: Callable[[Any, DeviceMesh], Any],
        data_parallel_size: int | str = "auto",
        tensor_parallel_size: int | str = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = DEFAULT_TIMEOUT,
        start_method: str = "popen",
        save_timeout: timedelta = DEFAULT_SAVE_TIMEOUT,
        check_collectives: bool = False,
    ) -> None:
        super().__init__(
            "sharded" if save_distributed_checkpoint else "full",
            process_group_backend,
            timeout,
            start_method,
            save_timeout,
            check_collectives,
        )
        if not callable(parallelize_fn):
            raise TypeError(
                f"ModelParallelStrategy(parallelize_fn={parallelize_fn!r}) must be a function"
                " `(model, device_mesh) -> model`."
            )
        self.parallelize_fn = parallelize_fn
        self._data_parallel_size = _check_size(data_parallel_size, "data_parallel_size")
        self._tensor_parallel_size = _check_size(tensor_parallel_size, "tensor_parallel_size")
        self._mesh: DeviceMesh | None = None

    @override
    def check_compatible(
        self, *, accelerator: AcceleratorName, world_size: int, probe: HardwareProbe
    ) -> None:
        super().check_compatible(accelerator=accelerator, world_size=world_size, probe=probe)
        if self._data_parallel_size is not None or self._tensor_parallel_size is not None:
            resolve_mesh_sizes(self._data_parallel_size, self._tensor_parallel_size, world_size, 1)

    @property
    def mesh_sizes(self) -> tuple[int, int]:
        """``(data_parallel_size, tensor_parallel_size)``."""
        return resolve_mesh_sizes(
            self._data_parallel_size, self._tensor_parallel_size, self.world_size, self.runtime.num_nodes
        )

    @property
    def device_mesh(self) -> DeviceMesh:
        """The ``("data_parallel", "tensor_parallel")`` mesh (available after launch)."""
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(
                self.root_device.type, self.mesh_sizes, mesh_dim_names=(DATA_PARALLEL, TENSOR_PARALLEL)
            )
        return self._mesh

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        _ = self.device_mesh

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, int] | None:
        dp, tp = self.mesh_sizes
        return {"num_replicas": dp, "rank": self.global_rank // tp}

    @override
    def _shard(self, module: torch.nn.Module, compiler: Callable[..., Any] | None) -> torch.nn.Module:
        from handloom.sharding.materialize import has_meta_tensors

        result = self.parallelize_fn(module, self.device_mesh)
        if not isinstance(result, torch.nn.Module):
            fn_name = getattr(self.parallelize_fn, "__name__", self.parallelize_fn)
            raise TypeError(
                f"ModelParallelStrategy(parallelize_fn={fn_name!r})"
                f" returned {type(result).__name__} ({result!r:.60}), not a torch.nn.Module. Return the model"
                " from parallelize_fn."
            )
        if compiler is not None:
            from handloom.sharding.apply import compile_blocks

            compile_blocks([result], compiler)
        if not has_meta_tensors(result):
            result.to(self.root_device)
        return result
