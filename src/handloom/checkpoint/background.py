"""Asynchronous saves: at most one write in flight per process, its failure raised, never dropped.

``fabric.save(..., async_save=True)`` copies the state to host memory (:func:`host_copy`, or
DCP's own staging for sharded state) and hands the write to :func:`submit`, which runs it on a
background thread. The next save first waits for the one in flight (:func:`wait`) and raises its
error; a launched worker function waits before it returns; and an exit hook installed by Fabric
waits before the interpreter ends (:func:`wait_at_exit`). The write itself is the same crash-safe
write as a blocking save.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Writes one checkpoint file: (path, payload).
_Writer = Callable[[Path, dict[str, Any]], None]


class CheckpointSaveError(RuntimeError):
    """A background checkpoint write failed; the checkpoint it was writing does not exist."""


class _Pending:
    def __init__(self, path: str, work: Callable[[], None]) -> None:
        self.path = path
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(work,), name="handloom-save", daemon=False)

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as err:  # handed to the training thread by wait()
            self.error = err


_pending: _Pending | None = None
_lock = threading.Lock()


def submit(path: str, work: Callable[[], None]) -> None:
    """Run ``work`` (which writes ``path``) in the background, after the save in flight has finished.

    Raises:
        CheckpointSaveError: The previous background save failed.
    """
    global _pending
    wait()
    pending = _Pending(path, work)
    with _lock:
        _pending = pending
    pending.thread.start()


def in_flight() -> str | None:
    """The path being written in the background, if any."""
    pending = _pending
    return pending.path if pending is not None and pending.thread.is_alive() else None


def wait() -> None:
    """Block until the background save (if any) has finished.

    Raises:
        CheckpointSaveError: It failed; the message names the checkpoint and the cause.
    """
    global _pending
    with _lock:
        pending, _pending = _pending, None
    if pending is None:
        return
    pending.thread.join()
    if pending.error is not None:
        cause = str(pending.error).rstrip(".")
        raise CheckpointSaveError(
            f"The background save of {pending.path!r} failed: {type(pending.error).__name__}: {cause}."
            " That checkpoint was not written (any earlier checkpoint at that path is intact). Fix the"
            " cause and save again."
        ) from pending.error


# Host buffers kept between async saves, by place in the state and tensor layout. Copying into
# memory that is already mapped avoids a page fault per 4 KiB, which dominates a copy into fresh
# memory; the price is one resident copy of the saved state between saves.
_buffers: dict[tuple[Any, ...], torch.Tensor] = {}


def host_copy(obj: Any, reuse_buffers: bool = False) -> Any:
    """A copy of ``obj`` whose tensors live in their own CPU memory, so training can go on changing its own.

    Tensors that share memory (tied weights) stay shared in the copy. With ``reuse_buffers`` the
    copy goes into the buffers of the previous call where the layout matches (the caller makes
    sure no write still reads them).
    """
    memo: dict[tuple[Any, ...], torch.Tensor] = {}
    used: set[tuple[Any, ...]] = set()

    def copy(value: Any, where: tuple[Any, ...]) -> Any:
        if isinstance(value, torch.Tensor):
            key = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), value.shape,
                   value.stride(), value.dtype)  # fmt: skip
            if key not in memo:
                memo[key] = _buffer_for(value, where, reuse_buffers, used)
            return memo[key]
        if isinstance(value, OrderedDict):
            ordered = OrderedDict((k, copy(v, (*where, k))) for k, v in value.items())
            if hasattr(value, "_metadata"):  # state_dict versions that load_state_dict reads
                ordered._metadata = value._metadata  # type: ignore[attr-defined]
            return ordered
        if isinstance(value, dict):
            return {k: copy(v, (*where, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [copy(v, (*where, i)) for i, v in enumerate(value)]
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(copy(v, (*where, i)) for i, v in enumerate(value))
        return value

    copied = copy(obj, ())
    if reuse_buffers:
        for stale in set(_buffers) - used:
            del _buffers[stale]
    return copied


def _buffer_for(
    value: torch.Tensor, where: tuple[Any, ...], reuse: bool, used: set[tuple[Any, ...]]
) -> torch.Tensor:
    detached = value.detach()
    if not reuse:
        return detached.cpu() if detached.device.type != "cpu" else detached.clone()
    slot = (where, tuple(detached.shape), detached.dtype)
    buffer = _buffers.get(slot)
    if buffer is None:
        pin = detached.device.type == "cuda"
        buffer = torch.empty(detached.shape, dtype=detached.dtype, device="cpu", pin_memory=pin)
        _buffers[slot] = buffer
    used.add(slot)
    buffer.copy_(detached)
    return buffer


def write_file(path: Path, payload: dict[str, Any], async_save: bool, write: _Writer | None = None) -> None:
    """Write ``payload`` at ``path``, now or (``async_save``) in the background.

    ``write`` writes it (default: atomically, :func:`handloom.checkpoint.io.write_atomic`).
    """
    from handloom.checkpoint.io import write_atomic

    write_payload = write or write_atomic
    if not async_save:
        wait()
        write_payload(path, payload)
        return
    wait()  # the write in flight reads the buffers the copy goes into
    copied = host_copy(payload, reuse_buffers=True)
    submit(str(path), lambda: write_payload(path, copied))


def write_shared(
    path: Path,
    build: Callable[[], dict[str, Any]] | None,
    async_save: bool,
    share: Callable[[str | None], str | None],
    write: _Writer | None = None,
) -> None:
    """Write ``path`` from one rank while every rank waits until the file is committed.

    The writing rank passes ``build`` (which makes the payload), the others ``None``; ``write``
    writes it (default: atomically, :func:`handloom.checkpoint.io.write_atomic`). ``share`` is
    a collective that every rank calls once, after the write: it hands the writer's failure
    (``None`` once the file is committed) to every rank. With ``async_save`` the write and
    ``share`` run in the background on every rank, so each rank's next save or load waits for the
    commit; a failed background write is raised on the writing rank.

    Raises:
        RuntimeError: On the other ranks, when the writing rank failed (synchronous saves).
    """
    from handloom.checkpoint.io import write_atomic

    wait()  # also: the write in flight reads the buffers the copy goes into
    if build is None:
        if async_save:

            def wait_for_writer() -> None:
                share(None)  # the writing rank raises its own failure

            submit(str(path), wait_for_writer)
            return
        failure = share(None)
        if failure is not None:
            raise RuntimeError(
                f"fabric.save({str(path)!r}) failed on global rank 0, which writes the file: {failure}."
                " Nothing was written (a previous file at that path is intact). Fix the cause (see rank"
                " 0's error) and save again."
            )
        return

    write_payload = write or write_atomic

    def write_and_share(payload: dict[str, Any]) -> None:
        try:
            write_payload(path, payload)
        except BaseException as err:
            share(_failure(err))
            raise
        share(None)

    try:
        payload = build()
        if async_save:
            payload = host_copy(payload, reuse_buffers=True)
    except BaseException as err:
        share(_failure(err))
        raise
    if async_save:
        submit(str(path), lambda: write_and_share(payload))
    else:
        write_and_share(payload)


def _failure(err: BaseException) -> str:
    """How the writing rank's failure is told to the other ranks."""
    return f"{type(err).__name__}: {str(err).rstrip('.')}"
