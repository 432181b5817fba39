"""What every multi-process strategy shares: the process group, its timeout and the collectives."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from handloom.strategies.base import Strategy

if TYPE_CHECKING:
    from handloom.devices import AcceleratorName, HardwareProbe

START_METHODS = ("popen", "spawn", "fork", "forkserver")
DEFAULT_TIMEOUT = timedelta(minutes=30)
# How long a collective save waits for every rank to call it before saying which ranks did not.
DEFAULT_SAVE_TIMEOUT = timedelta(seconds=15)


class ParallelStrategy(Strategy):
    """One process per device, joined in a ``torch.distributed`` process group.

    Args:
        process_group_backend: ``"gloo"``, ``"nccl"``, ... Defaults to NCCL on CUDA, gloo otherwise.
        timeout: How long a collective may wait for the other ranks.
        start_method: ``"popen"`` re-runs the script per process; ``"spawn"``, ``"fork"`` and
            ``"forkserver"`` start ``fabric.launch(fn)`` in new processes.
    """

    is_distributed = True

    def __init__(
        self,
        process_group_backend: str | None = None,
        timeout: timedelta | None = DEFAULT_TIMEOUT,
        start_method: str = "popen",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if start_method not in START_METHODS:
            choices = ", ".join(repr(m) for m in START_METHODS)
            raise ValueError(
                f"{owner}(start_method={start_method!r}) is not a known start method."
                f" Choose one of: {choices}."
            )
        if timeout is not None and not isinstance(timeout, timedelta):
            raise TypeError(
                f"{owner}(timeout={timeout!r}) must be a datetime.timedelta,"
                " for example timedelta(minutes=10)."
            )
        self.process_group_backend = process_group_backend
        self.timeout = timeout or DEFAULT_TIMEOUT
        self.start_method = start_method

    @override
    def check_compatible(
        self, *, accelerator: AcceleratorName, world_size: int, probe: HardwareProbe
    ) -> None:
        if accelerator == "mps" and world_size > 1:
            raise ValueError(
                f"Fabric(strategy={self.name!r}) cannot run several processes on Apple's MPS device."
                " Use devices=1, or accelerator='cpu' for multi-process training."
            )

    @property
    def backend(self) -> str:
        """The process group backend in use."""
        if self.process_group_backend is not None:
            return self.process_group_backend
        return "nccl" if self.root_device.type == "cuda" else "gloo"

    @override
    def setup_environment(self) -> None:
        if self.root_device.type == "cuda":
            torch.cuda.set_device(self.root_device)
        from handloom import distributed

        distributed.init_process_group(
            self.runtime.topology, backend=self.backend, timeout=self.timeout, device=self.root_device
        )

    @property
    @override
    def distributed_sampler_kwargs(self) -> tuple[int, int] | None:
        return self.world_size, self.global_rank

    @override
    def barrier(self, name: str | None = None) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    @override
    def all_reduce(self, tensor: torch.Tensor, reduce_op: Any = "mean", group: Any = None) -> torch.Tensor:
        from handloom import distributed

        return distributed.all_reduce(tensor.to(self.root_device), reduce_op, group)

    @override
    def all_gather(self, tensor: torch.Tensor, group: Any = None) -> torch.Tensor | list[torch.Tensor]:
        from handloom import distributed

        return distributed.all_gather(tensor.to(self.root_device), group)

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        from handloom import distributed

        return distributed.broadcast(obj, src, self.root_device)

    @override
    def teardown(self) -> None:
        from handloom import distributed

        distributed.destroy_process_group()
