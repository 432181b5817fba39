"""``lightning.fabric.utilities.data``: :class:`AttributeDict` and small DataLoader queries.

handloom's sampler injection lives in :mod:`handloom.data`.
"""

from __future__ import annotations

import os
from collections.abc import Sized
from typing import Any, TypeGuard

from torch.utils.data import IterableDataset

from handloom.utilities.rank_zero import rank_zero_warn

__all__ = ["AttributeDict", "has_iterable_dataset", "has_len", "sized_len", "suggested_max_num_workers"]


def has_iterable_dataset(dataloader: object) -> bool:
    """True when ``dataloader.dataset`` is an ``IterableDataset``."""
    return isinstance(getattr(dataloader, "dataset", None), IterableDataset)


def sized_len(dataloader: object) -> int | None:
    """``len(dataloader)``, or ``None`` when it has none (``TypeError``/``NotImplementedError``)."""
    try:
        return len(dataloader)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):
        return None


def has_len(dataloader: object) -> TypeGuard[Sized]:
    """True when ``len(dataloader)`` works; warns (rank 0) about a length of 0 or of an iterable dataset."""
    length = sized_len(dataloader)
    if length == 0:
        rank_zero_warn(
            f"{type(dataloader).__name__} has a length of 0, so a loop over it does nothing. Check the"
            " dataset and the batch size if that is not what you meant."
        )
    if length is not None and has_iterable_dataset(dataloader):
        rank_zero_warn(
            f"{type(dataloader).__name__} wraps an IterableDataset that defines __len__. With several"
            " workers that length is wrong unless each worker reads its own part of the data; make"
            " the dataset split its data by worker (torch.utils.data.get_worker_info())."
        )
    return length is not None


def _num_cpus_available() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def suggested_max_num_workers(local_world_size: int) -> int:
    """An upper bound for ``DataLoader(num_workers=...)``: the CPUs per local process, less one.

    Args:
        local_world_size: The number of training processes on this machine (``devices``).

    Returns:
        At least 1.

    Raises:
        ValueError: ``local_world_size`` is below 1.
    """
    if local_world_size < 1:
        raise ValueError(
            f"suggested_max_num_workers(local_world_size={local_world_size}) needs the number of"
            " processes on this machine, which is at least 1. Pass the devices count, e.g. 1."
        )
    # One CPU per process stays with the training loop itself.
    return max(1, _num_cpus_available() // local_world_size - 1)


class AttributeDict(dict[str, Any]):
    """A ``dict`` whose keys are also attributes: ``state.step += 1``.

    Meant for the state passed to ``fabric.save`` and ``fabric.load``. Its ``repr`` lists one
    ``"key": value`` per line, sorted by key, as Lightning's does.

    Example::

        state = AttributeDict(model=model, optimizer=optimizer, step=0)
        state.step += 1
        fabric.save("checkpoint.pt", state)
    """

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{key}'") from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __delattr__(self, key: str) -> None:
        del self[key]  # a KeyError for a missing key, as in Lightning

    def __repr__(self) -> str:
        if not self:
            return ""
        width = max(len(str(key)) for key in self) + 3  # the quotes and the colon
        labels = {key: '"' + str(key) + '":' for key in self}
        return "\n".join(f"{labels[key]:{width}} {self[key]}" for key in sorted(self))
