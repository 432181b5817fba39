"""``lightning.fabric.utilities.distributed``: shared-filesystem check, sampler wrapper."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed import ReduceOp, group
from torch.utils.data import Dataset, DistributedSampler

if TYPE_CHECKING:
    from handloom.strategies.base import Strategy

__all__ = ["DistributedSamplerWrapper", "ReduceOp", "group", "is_shared_filesystem"]

_URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
_CHECK_FILE = ".handloom_shared_fs_check"


def _distributed_is_initialized() -> bool:
    """True when ``torch.distributed`` is built in and its default process group exists."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_local_path(path: str | os.PathLike[str]) -> bool:
    match = _URL_SCHEME.match(os.fspath(path))
    return match is None or match.group(1).lower() in ("file", "local")


def is_shared_filesystem(
    strategy: Strategy, path: str | os.PathLike[str] | None = None, timeout: float = 3
) -> bool:
    """Whether every process sees the same files under ``path`` (a network filesystem, or one node).

    A collective: every process must call it. Remote URLs (``s3://...``) count as shared. Otherwise
    the processes compare the resolved path, rank 0 creates a file in that directory and the others
    look for it for up to ``timeout`` seconds.

    Args:
        strategy: ``fabric.strategy``.
        path: A directory (or a file, meaning its directory) that exists on every process and that
            rank 0 may write to; the current directory by default.
        timeout: How long the other ranks wait for rank 0's file, in seconds.

    Returns:
        The same answer on every process.

    Raises:
        FileNotFoundError: ``path`` does not exist on some process.
    """
    if path is not None and not _is_local_path(path):
        return True
    resolved = Path(Path.cwd() if path is None else path).resolve()
    if strategy.world_size == 1:
        return True
    rank_zero_path = strategy.broadcast(resolved)
    if strategy.any_rank(rank_zero_path != resolved, "is_shared_filesystem"):
        return False
    if strategy.any_rank(not resolved.exists(), "is_shared_filesystem"):
        raise FileNotFoundError(
            f"is_shared_filesystem(path={os.fspath(resolved)!r}) cannot check a path that is missing on"
            " some process. Pass a directory that exists on every machine, e.g. the checkpoint"
            " directory after creating it."
        )
    directory = resolved.parent if resolved.is_file() else resolved
    check_file = directory / _CHECK_FILE
    check_file.unlink(missing_ok=True)
    strategy.barrier()
    if strategy.is_global_zero:
        check_file.touch()
        found = True
    else:
        deadline = time.perf_counter() + timeout
        found = check_file.exists()
        while not found and time.perf_counter() < deadline:
            time.sleep(0.01)
            found = check_file.exists()
    strategy.barrier()
    shared = not strategy.any_rank(not found, "is_shared_filesystem")
    with contextlib.suppress(OSError):  # another process on the same filesystem removed it first
        check_file.unlink()
    return shared


class _SamplerIndices(Dataset[Any]):
    """The indices a sampler yields, as a dataset (drawn again by :meth:`redraw`)."""

    def __init__(self, sampler: Iterable[Any]) -> None:
        if not isinstance(sampler, Sized):
            raise TypeError(
                f"DistributedSamplerWrapper got a {type(sampler).__name__}, which has no len(), so it"
                " cannot be split among processes. Give the sampler a __len__, or pass"
                " use_distributed_sampler=False and split the data yourself."
            )
        if len(sampler) == float("inf"):
            raise TypeError(
                f"DistributedSamplerWrapper got a {type(sampler).__name__} of infinite length, which"
                " cannot be split among processes. Give it a finite __len__, or pass"
                " use_distributed_sampler=False and split the data yourself."
            )
        self.sampler = sampler
        self._drawn: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, index: int) -> Any:
        if self._drawn is None:
            self._drawn = list(self.sampler)
        return self._drawn[index]

    def redraw(self) -> None:
        """Draw the sampler's sequence again (a new shuffle for a random sampler)."""
        self._drawn = list(self.sampler)


class DistributedSamplerWrapper(DistributedSampler[Any]):
    """Split the indices of any sampler among processes, as ``DistributedSampler`` splits a dataset.

    Each pass draws the wrapped sampler's whole sequence on every process and gives each its part,
    arranged by ``DistributedSampler`` (with its ``shuffle``, ``seed``, ``drop_last`` and padding).
    The sequences must be the same on every process: seed a random sampler identically everywhere.

    Args:
        sampler: A sampler (or any iterable of indices) with a finite ``len()``.
        *args: ``DistributedSampler``'s arguments after the dataset: ``num_replicas``, ``rank``,
            ``shuffle``, ``seed``, ``drop_last``.
        **kwargs: The same, by name.

    Raises:
        TypeError: ``sampler`` has no finite length.
    """

    def __init__(self, sampler: Iterable[Any], *args: Any, **kwargs: Any) -> None:
        self._indices = _SamplerIndices(sampler)
        super().__init__(self._indices, *args, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        self._indices.redraw()
        return (self._indices[position] for position in super().__iter__())
