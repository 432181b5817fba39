"""What every multi-process strategy shares: the process group, its timeout and the collectives."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from handloom.strategies.base import Strategy

if TYPE_CHECKING:
    from handloom.accelerators import Accelerator
    from handloom.checkpoint.state import SaveRequest
    from handloom.devices import AcceleratorName, HardwareProbe
    from handloom.environments import ClusterEnvironment
    from handloom.plugins.io import CheckpointIO
    from handloom.plugins.precision import Precision

START_METHODS = ("popen", "spawn", "fork", "forkserver")
# torch's own default for NCCL. A dead rank ends the job within seconds whatever this is (the
# launcher stops the others, and gloo fails on a closed connection); the timeout bounds the rest:
# a collective that some ranks never reach. torch's gloo default of 30 minutes is too long to wait.
DEFAULT_TIMEOUT = timedelta(minutes=10)
# How long a collective save waits for every rank to call it before saying which ranks did not.
DEFAULT_SAVE_TIMEOUT = timedelta(seconds=15)


class ParallelStrategy(Strategy):
    """One process per device, joined in a ``torch.distributed`` process group.

    Args:
        accelerator: An :class:`~handloom.accelerators.Accelerator` (Lightning's argument).
        parallel_devices: The devices of this node's processes, e.g. ``[torch.device("cpu")] * 2``
            (Lightning's argument): it fixes the accelerator and the process count, so
            ``Fabric(devices=...)`` may be left at ``"auto"``.
        cluster_environment: The cluster environment to use instead of auto-detection, like
            ``Fabric(plugins=[environment])``.
        checkpoint_io: A ``CheckpointIO`` plugin (Lightning's argument).
        precision: A precision plugin (Lightning's argument).
        process_group_backend: ``"gloo"``, ``"nccl"``, ... Defaults to NCCL on CUDA, gloo otherwise.
        timeout: How long a collective may wait for the other ranks (default 10 minutes).
        start_method: ``"popen"`` re-runs the script per process; ``"spawn"``, ``"fork"`` and
            ``"forkserver"`` start ``fabric.launch(fn)`` in new processes.
        check_collectives: Turn on torch's collective checks (``TORCH_DISTRIBUTED_DEBUG=DETAIL``)
            before the process group is created.
        save_timeout: How long ``fabric.save`` (collective: every rank calls it) waits for every
            rank before it raises naming those that did not call it (default 15 s).
    """

    is_distributed = True

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = DEFAULT_TIMEOUT,
        start_method: str = "popen",
        check_collectives: bool = False,
        save_timeout: timedelta = DEFAULT_SAVE_TIMEOUT,
    ) -> None:
        super().__init__(accelerator=accelerator, checkpoint_io=checkpoint_io, precision=precision)
        owner = type(self).__name__
        self.parallel_devices = parallel_devices
        self.cluster_environment = cluster_environment
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
        if not isinstance(check_collectives, bool):
            raise TypeError(f"{owner}(check_collectives={check_collectives!r}) must be True or False.")
        if timeout is not None and timeout.total_seconds() <= 0:
            raise ValueError(
                f"{owner}(timeout={timeout!r}) must be positive: it is how long a collective waits for"
                " the other ranks. Pass for example timedelta(minutes=10)."
            )
        if not isinstance(save_timeout, timedelta) or save_timeout.total_seconds() <= 0:
            raise (ValueError if isinstance(save_timeout, timedelta) else TypeError)(
                f"{owner}(save_timeout={save_timeout!r}) must be a positive datetime.timedelta,"
                " for example timedelta(seconds=60)."
            )
        self.process_group_backend = process_group_backend
        self.timeout = timeout or DEFAULT_TIMEOUT
        self.check_collectives = check_collectives
        self.start_method = start_method
        self.save_timeout = save_timeout
        self._cpu_group: Any = None
        # Checkpoint coordination (arrival check, path agreement, per-rank entries, the writer's
        # outcome, DCP's async-save collectives from a background thread) runs on its own gloo
        # group, apart from training's collectives.
        self._checkpoint_group: Any = None
        self._checkpoint_group_broken = False

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
    def parallel_devices(self) -> list[torch.device] | None:
        """The devices of this node's processes as given to the constructor (``None`` when not
        given: Fabric's ``devices`` argument chose them)."""
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        if getattr(self, "_runtime", None) is not None:
            raise RuntimeError(
                f"{type(self).__name__}.parallel_devices was set after the strategy started running."
                f" Pass them to {type(self).__name__}(parallel_devices=...) instead."
            )
        self._parallel_devices = _check_parallel_devices(devices, type(self).__name__)

    @property
    def num_processes(self) -> int:
        """Processes on this node (0 when neither given nor planned yet)."""
        if self._parallel_devices is not None:
            return len(self._parallel_devices)
        if self._runtime is not None:
            return self.world_size // self._runtime.num_nodes
        return 0

    @property
    def num_nodes(self) -> int:
        """Nodes in the job (1 until the strategy runs)."""
        return self._runtime.num_nodes if self._runtime is not None else 1

    @property
    @override
    def root_device(self) -> torch.device:
        """This process's device; before launch, the first of ``parallel_devices`` if they were given."""
        if self._runtime is None and self._parallel_devices:
            return self._parallel_devices[self.local_rank]
        return super().root_device

    @property
    def backend(self) -> str:
        """The process group backend in use."""
        if self.process_group_backend is not None:
            return self.process_group_backend
        return "nccl" if self.root_device.type == "cuda" else "gloo"

    @override
    def setup_environment(self) -> None:
        super().setup_environment()  # the accelerator prepares the device (CUDA: the current device)
        if self.root_device.type == "cuda":
            torch.cuda.set_device(self.root_device)  # also under a custom accelerator that does not
        from handloom import distributed

        if self.check_collectives:
            import torch.distributed as dist

            # Public and documented (torch.distributed.set_debug_level), but not re-exported in the stubs.
            detail = dist.DebugLevel.DETAIL  # type: ignore[attr-defined]
            dist.set_debug_level(detail)  # type: ignore[attr-defined]  # read when the group is created
        distributed.init_process_group(
            self.runtime.topology, backend=self.backend, timeout=self.timeout, device=self.root_device
        )
        self._checkpoint_group = distributed.new_side_group(self.timeout)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, int] | None:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def _naming_failures(self, what: str) -> AbstractContextManager[None]:
        from handloom import distributed

        return distributed.naming_failures(what, self.timeout, type(self).__name__)

    @override
    def barrier(self, name: str | None = None) -> None:
        if not torch.distributed.is_initialized():
            return
        from handloom import distributed

        with self._naming_failures("fabric.barrier()" if name is None else f"fabric.barrier({name!r})"):
            if name is None:
                torch.distributed.barrier()
                return
            names = distributed.barrier_names(name)
        distributed.check_barrier_names(name, names)

    @override
    def any_rank(self, flag: bool, what: str) -> bool:
        """An all-reduce of one CPU integer: on gloo directly, beside NCCL on a gloo group of its own.

        Polled every step (``fabric.preemption_requested()``), so it never waits for the device.
        The first call creates the gloo group, which every rank does at the same call.
        """
        if not torch.distributed.is_initialized() or self.world_size == 1:
            return flag
        from handloom import distributed

        group = None
        if self.backend != "gloo":
            if self._cpu_group is None:
                self._cpu_group = distributed.new_side_group(self.timeout)
            group = self._cpu_group
        value = torch.tensor([int(flag)], dtype=torch.int32)
        with self._naming_failures(what):
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=group)
        return bool(value.item())

    @override
    def all_reduce(self, tensor: torch.Tensor, reduce_op: Any = "mean", group: Any = None) -> torch.Tensor:
        """Reduce ``tensor`` over processes in place and return it (a tensor on another device: a copy
        moved to this process's device); with one process it is returned unchanged."""
        if self.world_size == 1:
            return super().all_reduce(tensor, reduce_op, group)
        from handloom import distributed

        with self._naming_failures("fabric.all_reduce"):
            return distributed.all_reduce(tensor, reduce_op, group, device=self.root_device)

    @override
    def all_gather(self, tensor: torch.Tensor, group: Any = None) -> torch.Tensor | list[torch.Tensor]:
        from handloom import distributed

        with self._naming_failures("fabric.all_gather"):
            return distributed.all_gather(tensor.to(self.root_device), group)

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        from handloom import distributed

        with self._naming_failures("fabric.broadcast"):
            return distributed.broadcast(obj, src, self.root_device)

    # --- checkpoints ----------------------------------------------------------------------------
    @override
    def save_checkpoint(self, request: SaveRequest) -> None:
        """Every rank calls it; global rank 0 writes one file; no rank returns before it is committed."""
        from handloom.checkpoint import background
        from handloom.checkpoint import state as user_state

        user_state.check_filter(request.state, request.filter)
        background.wait()
        request = self._agree_on_save(request)

        def build() -> dict[str, Any]:
            return user_state.collect_state(request.state, request.filter)

        writer = build if self.global_rank == 0 else None
        background.write_shared(
            request.path, writer, request.async_save, self._from_rank_zero, self._file_writer(request)
        )

    def _agree_on_save(self, request: SaveRequest) -> SaveRequest:
        """Wait until every rank calls ``fabric.save``, check they name one path, gather per-rank entries.

        Returns the request with every rank's entries in its per-rank values (see
        :meth:`SaveRequest.with_ranks`).

        Raises:
            RuntimeError: Some ranks did not call it within ``save_timeout`` (named), the ranks
                passed different paths (each rank's listed), or an earlier save broke the group.
        """
        _ = self.runtime  # before launch: the "not running yet" error
        group = self._checkpoint_group
        if group is None:
            return request.with_ranks([request.rank_entries])
        import torch.distributed as dist

        from handloom import distributed

        what = f"fabric.save({str(request.path)!r})"
        if self._checkpoint_group_broken:
            raise RuntimeError(
                f"{what} cannot run: an earlier save timed out waiting for some ranks, which closed the"
                " connections handloom coordinates saves over. Restart the job (from the last complete"
                " checkpoint) after making every rank call fabric.save."
            )
        try:
            distributed.await_ranks(group, self.save_timeout, what=what, owner=self)
        except RuntimeError:
            self._checkpoint_group_broken = True
            raise
        mine = (str(request.path), os.path.abspath(request.path), request.rank_entries)
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=group)
        if len({where for _, where, _ in gathered}) > 1:
            paths = ", ".join(f"rank {rank}: {given!r}" for rank, (given, _, _) in enumerate(gathered))
            raise RuntimeError(
                f"fabric.save was called with different paths on different ranks ({paths}). A save under"
                f" {type(self).__name__} is collective and writes one checkpoint, so every rank must pass"
                " the same path; a save inside `if fabric.is_global_zero:` meets the other ranks' next"
                " save this way. Nothing was saved: call fabric.save on every rank, with the same path."
            )
        return request.with_ranks([entries for _, _, entries in gathered])

    def _from_rank_zero(self, value: Any) -> Any:
        """Global rank 0's ``value`` on every rank, over the checkpoint group (every rank calls it)."""
        if self._checkpoint_group is None:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._checkpoint_group)
        return box[0]

    @override
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_cpu_group"] = None  # a process group belongs to the process that created it
        state["_checkpoint_group"] = None
        return state

    @override
    def teardown(self) -> None:
        from handloom import distributed

        distributed.destroy_process_group()


def _check_parallel_devices(devices: object, owner: str) -> list[torch.device] | None:
    """``devices`` as a list of ``torch.device`` (strings are converted), or ``None``.

    Raises:
        TypeError: Not a list of devices.
        ValueError: An empty list, or devices of more than one type.
    """
    if devices is None:
        return None
    if not isinstance(devices, (list, tuple)) or not all(isinstance(d, (str, torch.device)) for d in devices):
        raise TypeError(
            f"{owner}(parallel_devices={devices!r}) must be a list of torch.device objects,"
            " for example [torch.device('cuda', 0), torch.device('cuda', 1)]."
        )
    result = [torch.device(d) for d in devices]
    if not result:
        raise ValueError(
            f"{owner}(parallel_devices=[]) lists no device. List one device per process on this node,"
            " or leave it out and pass Fabric(devices=...)."
        )
    kinds = sorted({d.type for d in result})
    if len(kinds) > 1:
        raise ValueError(
            f"{owner}(parallel_devices=...) mixes device types ({', '.join(kinds)})."
            " List devices of one type only."
        )
    return result
