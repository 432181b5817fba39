"""Process-group lifecycle and the collectives Fabric exposes, on top of ``torch.distributed``."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from handloom.environments import Topology

_ReduceOp = Any  # torch.distributed.ReduceOp members are not typed as a class
_MAX_DIMS = 16
# Fixed codes so every rank can describe a tensor's dtype in an integer header.
_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
)  # fmt: skip
_REDUCE_OPS = ("sum", "mean", "avg", "max", "min", "product")
_teardown_registered = False
_EXIT_DRAIN_SECONDS = 0.25


def init_process_group(topology: Topology, *, backend: str, timeout: timedelta, device: torch.device) -> None:
    """Create the default process group for ``topology`` unless one exists, and arrange its teardown.

    Under torchelastic (``torchrun``, ``handloom run``, ``fabric.launch()``) the agent's store is
    reused through ``env://``; otherwise a TCP rendezvous at the topology's main address is used.

    Raises:
        RuntimeError: A process group already exists with another world size.
    """
    if dist.is_initialized():
        if dist.get_world_size() != topology.world_size:
            raise RuntimeError(
                f"A torch.distributed process group with world size {dist.get_world_size()} already exists,"
                f" but this job has {topology.world_size} processes. Destroy it with"
                " torch.distributed.destroy_process_group() before creating the Fabric object."
            )
        return
    device_id = device if device.type == "cuda" else None
    if topology.name == "torchelastic" and topology.agent_store:
        dist.init_process_group(
            backend,
            store=_attempt_store(topology, timeout),
            rank=topology.global_rank,
            world_size=topology.world_size,
            timeout=timeout,
            device_id=device_id,
        )
    elif topology.name == "torchelastic":
        dist.init_process_group(backend, init_method="env://", timeout=timeout, device_id=device_id)
    else:
        address, port = _rendezvous_address(topology)
        dist.init_process_group(
            backend,
            init_method=f"tcp://{address}:{port}",
            rank=topology.global_rank,
            world_size=topology.world_size,
            timeout=timeout,
            device_id=device_id,
        )
    _register_teardown()
    _limit_cpu_threads(topology)


def _attempt_store(topology: Topology, timeout: timedelta) -> Any:
    """The agent's store, seen through a prefix of its own for this restart of the workers.

    With a static rendezvous the agent keeps one store for the whole job, so after a restart
    (``--max-restarts``) the keys the previous workers wrote, such as their gloo addresses, are
    still there, and a restarted worker may read them and try to reach a process that is gone.
    """
    assert topology.main_address is not None and topology.main_port is not None  # torchelastic sets both
    # Public and documented as torch.distributed.TCPStore / PrefixStore; the stubs do not re-export them.
    store = dist.TCPStore(  # type: ignore[attr-defined]
        topology.main_address,
        topology.main_port,
        world_size=topology.world_size,
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"handloom/attempt-{topology.restart_count}", store)  # type: ignore[attr-defined]


def _rendezvous_address(topology: Topology) -> tuple[str, int]:
    address, port = topology.main_address, topology.main_port
    if (address is None or port is None) and topology.name == "mpi":
        from handloom.environments.mpi import discover_main_address_with_mpi

        return discover_main_address_with_mpi()
    if port is None:
        if topology.world_size > 1:
            raise RuntimeError(
                f"The {topology.name} environment gives no port for the {topology.world_size} processes"
                " to meet at. Set MASTER_ADDR and MASTER_PORT, or start the job with `handloom run`."
            )
        from handloom.launcher import find_free_port

        port = find_free_port()  # a one-process group only needs a port nobody else uses
    return address or "127.0.0.1", port


def _limit_cpu_threads(topology: Topology) -> None:
    # Several CPU processes on one node each default to all cores; that oversubscribes the machine.
    local = topology.local_world_size or 1
    if local > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _register_teardown() -> None:
    global _teardown_registered
    if not _teardown_registered:
        atexit.register(_teardown_at_exit)
        _teardown_registered = True


def destroy_process_group() -> None:
    """Destroy the default process group if it exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _teardown_at_exit() -> None:
    """Destroy the process group, then let gloo's threads finish freeing tensors before Python stops.

    A gloo thread frees the tensors of the last collective after it completes, which needs the GIL.
    If that happens while the interpreter finalises, the thread is torn down mid-way and the process
    aborts ("terminate called without an active exception"), turning a finished job into a failed
    one. Once a DDP model has existed, torch keeps the group alive even after it is destroyed, so
    the threads cannot be joined either. Collecting garbage and releasing the GIL for a moment lets
    any such pending frees finish first.
    """
    destroy_process_group()
    gc.collect()
    time.sleep(_EXIT_DRAIN_SECONDS)


def resolve_reduce_op(op: str | _ReduceOp) -> tuple[_ReduceOp, bool]:
    """Map ``"sum"``, ``"mean"``, ``"max"``, ... or a ``ReduceOp`` to ``(ReduceOp, divide_by_world)``.

    Raises:
        ValueError: Unknown operation name.
    """
    if not isinstance(op, str):
        if op == dist.ReduceOp.AVG:
            return dist.ReduceOp.SUM, True
        return op, False
    name = op.lower()
    if name not in _REDUCE_OPS:
        choices = ", ".join(repr(n) for n in _REDUCE_OPS if n != "avg")
        raise ValueError(f"all_reduce(reduce_op={op!r}) is not a known reduction. Choose one of: {choices}.")
    if name in ("mean", "avg"):
        return dist.ReduceOp.SUM, True
    return getattr(dist.ReduceOp, name.upper()), False


def all_reduce(
    tensor: torch.Tensor, op: str | _ReduceOp, group: Any = None, device: torch.device | None = None
) -> torch.Tensor:
    """Reduce ``tensor`` across ranks in place and return it, as ``torch.distributed.all_reduce`` does.

    A mean sums, then divides in place: an integer tensor keeps its dtype and receives the true
    mean truncated toward zero (Lightning's behaviour). A tensor on another device than ``device``
    (the one the backend communicates from) is moved there first and the moved copy is reduced and
    returned, leaving the caller's tensor as it was, as Lightning does. A tensor that is not
    contiguous is reduced through a copy that is written back into it.
    """
    reduce_op, divide = resolve_reduce_op(op)
    if device is not None and tensor.device != device:
        tensor = tensor.to(device)
    work = tensor
    if not tensor.is_contiguous():
        work = tensor.contiguous()
    dist.all_reduce(work, op=reduce_op, group=group)
    if divide:
        world = dist.get_world_size(group)
        if work.is_floating_point() or work.is_complex():
            work.div_(world)
        else:
            work.copy_(work / world)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def _describe(tensor: torch.Tensor | None, device: torch.device, kind: int = 1) -> torch.Tensor:
    header = torch.zeros(3 + _MAX_DIMS, dtype=torch.int64, device=device)
    header[0] = kind
    if tensor is not None:
        if tensor.dim() > _MAX_DIMS or tensor.dtype not in _DTYPES:
            raise ValueError(
                f"Cannot communicate a tensor of dtype {tensor.dtype} with {tensor.dim()} dimensions."
                f" Use one of {len(_DTYPES)} standard dtypes and at most {_MAX_DIMS} dimensions."
            )
        header[1] = tensor.dim()
        header[2] = _DTYPES.index(tensor.dtype)
        if tensor.dim():
            header[3 : 3 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    return header


def _shape_of(header: torch.Tensor) -> tuple[int, ...]:
    values = header.tolist()
    return tuple(values[3 : 3 + values[1]])


def all_gather(tensor: torch.Tensor, group: Any = None) -> torch.Tensor | list[torch.Tensor]:
    """Gather ``tensor`` from every rank.

    Returns a tensor of shape ``(world_size, *shape)`` when every rank sent the same shape, and a
    list with each rank's tensor (in rank order) when the shapes differ.

    Raises:
        ValueError: Ranks sent tensors with different dtypes or numbers of dimensions.
    """
    world = dist.get_world_size(group)
    header = _describe(tensor, tensor.device)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header, group=group)
    kinds = {(int(h[1]), int(h[2])) for h in headers}
    if len(kinds) != 1:
        found = sorted({f"{_DTYPES[d]} with {n} dims" for n, d in kinds})
        raise ValueError(
            f"all_gather got tensors of different kinds across ranks: {', '.join(found)}."
            " Every rank must pass a tensor of the same dtype and number of dimensions."
        )
    shapes = [_shape_of(h) for h in headers]
    if all(shape == shapes[0] for shape in shapes):
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.stack(parts)
    max_shape = [max(sizes) for sizes in zip(*shapes, strict=True)]
    padded = tensor.new_zeros(max_shape)
    padded[tuple(slice(0, s) for s in tensor.shape)] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return [part[tuple(slice(0, s) for s in shape)] for part, shape in zip(parts, shapes, strict=True)]


def broadcast(obj: Any, src: int, device: torch.device, group: Any = None) -> Any:
    """Send ``obj`` from rank ``src`` to every rank and return it.

    Tensors travel as raw data behind a small integer header (no pickling); other objects go
    through ``broadcast_object_list``. Receivers may pass anything, e.g. ``None``.
    """
    rank = dist.get_rank(group)
    is_tensor = isinstance(obj, torch.Tensor)
    header = _describe(obj if is_tensor and rank == src else None, device, kind=1 if is_tensor else 0)
    dist.broadcast(header, src=src, group=group)
    if int(header[0]) == 1:
        values = header.tolist()
        if rank == src:
            data = obj.to(device).contiguous()
        else:
            data = torch.empty(_shape_of(header), dtype=_DTYPES[values[2]], device=device)
        dist.broadcast(data, src=src, group=group)
        return data
    box = [obj if rank == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def new_side_group(timeout: timedelta) -> Any:
    """A gloo group over all ranks for coordination kept apart from training's collectives.

    Every rank must call this, in the same order. ``None`` without a multi-process group.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo", timeout=timeout)


def await_ranks(group: Any, timeout: timedelta, *, what: str, owner: object) -> None:
    """Return once every rank has reached this call; raise within ``timeout`` naming those that did not.

    ``torch.distributed.monitored_barrier`` (gloo) does the waiting, so a call made by only some
    ranks, such as a save under ``if fabric.is_global_zero:``, fails fast instead of
    hanging until the process-group timeout.

    Raises:
        RuntimeError: Some ranks did not arrive in time; the message names them and the fix.
    """
    if group is None:
        return
    try:
        dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=True)
    except RuntimeError as err:
        seconds = f"{timeout.total_seconds():g} s"
        rank = dist.get_rank()
        if rank == 0:
            missing = _missing_ranks(str(err))
            who = f"rank(s) {missing}" if missing else "some ranks"
            waited = f"{who} did not call it within {seconds}"
        else:
            waited = f"rank 0 did not call it within {seconds} (seen from rank {rank})"
        name = type(owner).__name__
        raise RuntimeError(
            f"{what} under {name} is collective: every rank must call it, but {waited}."
            " If the call sits inside `if fabric.is_global_zero:`, move it out: every rank takes part in"
            " a save (rank 0 writes a single file; under a sharded strategy each rank writes its shards)."
            " If those ranks were only slower (work done on some ranks just before the save), raise"
            f" {name}(save_timeout=...)."
        ) from err


def _missing_ranks(message: str) -> list[int]:
    match = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", message)
    if match is None:
        return []
    return [int(part) for part in match.group(1).replace(" ", "").split(",") if part]


# How torch's collective checks describe each rank's call in a mismatch.
_FINGERPRINT = re.compile(
    r"Rank (\d+) is running collective: CollectiveFingerPrint\(SequenceNumber=(\d+),? *OpType=(\w+)"
)
_AFTER_TORCH_ADVICE = re.compile(r"\s*(This may indicate|Please check|See the |To debug).*", re.DOTALL)


@contextlib.contextmanager
def naming_failures(what: str, timeout: timedelta, owner: str) -> Iterator[None]:
    """Re-raise a failed or timed-out collective as an error that names it and says what to do.

    A collective that some ranks never reach (one inside ``if fabric.is_global_zero:``, say) fails
    after ``timeout`` on the ranks that did; with collective checks on (torch's ``DETAIL`` debug
    level) torch also names the ranks that did not arrive, or the different collective they called.

    Raises:
        RuntimeError: The collective failed; the message names ``what``, the cause and the fix.
    """
    start = time.monotonic()
    try:
        yield
    except RuntimeError as err:
        raise RuntimeError(_collective_failure(what, err, time.monotonic() - start, timeout, owner)) from err


def _collective_failure(what: str, err: BaseException, elapsed: float, timeout: timedelta, owner: str) -> str:
    text = str(err)
    said = _AFTER_TORCH_ADVICE.sub("", " ".join(text.split()))[:400]
    rank = dist.get_rank() if dist.is_initialized() else 0
    order = (
        " Every rank must make the same collective calls in the same order: a call inside"
        " `if fabric.is_global_zero:` (or any branch only some ranks take) waits for ranks that never come."
    )
    checks = (
        " To see which ranks did not arrive and what they called instead, run with"
        " `handloom run --check-collectives` or"
        f" {owner}(check_collectives=True)."
    )
    missing = _missing_ranks(text)
    if missing:
        return (
            f"{what} on rank {rank} timed out after {elapsed:.1f} s: rank(s) {missing} did not reach it"
            f" within the collective timeout ({timeout.total_seconds():g} s).{order} Move the call out of"
            f" such a branch; if those ranks were only slower, raise {owner}(timeout=...)."
            f" (torch said: {said})"
        )
    if "mismatch between collectives" in text:
        # torch describes this rank's call reliably; the other side is its own checking exchange.
        mine = [(n, op) for r, n, op in _FINGERPRINT.findall(text) if int(r) == rank]
        call = f" ({mine[0][1]}, this rank's collective #{mine[0][0]})" if mine else ""
        return (
            f"{what} on rank {rank}{call} does not match the collective another rank called at this point."
            f"{order} Make every rank call the same collectives in the same order. (torch said: {said})"
        )
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (
            f"{what} on rank {rank} timed out after {elapsed:.1f} s waiting for the other ranks"
            f" (collective timeout: {timeout.total_seconds():g} s).{order} If the other ranks were only"
            f" slower (evaluation or a save on one rank), raise {owner}(timeout=...).{checks}"
            f" (torch said: {said})"
        )
    return (
        f"{what} failed on rank {rank} after {elapsed:.1f} s (torch said: {said}). If another rank exited or"
        f" died, its own error is the cause (see its output); if it finished normally, this call was made"
        f" only on some ranks.{order}{checks}"
    )


def barrier_names(name: str, group: Any = None) -> list[Any]:
    """Wait for every rank, like a barrier, and return the name each rank passed (by rank)."""
    names: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(names, name, group=group)
    return names


def check_barrier_names(name: str, names: list[Any]) -> None:
    """Raise when the ranks passed barriers of different names (see :func:`barrier_names`).

    Raises:
        RuntimeError: Ranks passed different names: they are at different points of the program.
    """
    if any(other != name for other in names):
        by_rank = ", ".join(f"rank {r}: {n!r}" for r, n in enumerate(names))
        raise RuntimeError(
            f"fabric.barrier({name!r}) met barriers of other names on other ranks ({by_rank}), so the ranks"
            " are at different points of the program. Make every rank pass the same barriers in the same"
            " order; a barrier inside a branch that only some ranks take cannot work."
        )
