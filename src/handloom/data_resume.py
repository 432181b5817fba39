"""Re-entering a dataloader pass in the middle, with the same sample order as the interrupted pass.

A pass's order is fixed when it starts: ``DataLoader.__iter__`` draws the worker base seed from
the global torch generator (or the loader's ``generator``), and a shuffling sampler draws its
permutation seed from the same source on its first ``next``. A set-up loader therefore records
the random states at the start of each pass (:func:`pass_snapshot`). To resume at batch ``p``,
:func:`resume_pass` puts those states back for a moment, builds the iterator over a copy of the
loader whose index sampler skips its first ``p`` entries (indices only: no sample is loaded or
collated), makes the sampler draw, and then restores the live random states. Samples after the
resume point see exactly the random streams the uninterrupted run saw.

Loaders without an index sampler (``IterableDataset``) are replayed instead: their first ``p``
batches are fetched and dropped. Random transforms that run inside worker processes
(``num_workers > 0``) restart their streams at the resume point.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

import torch
from torch.utils.data import DataLoader, IterableDataset

_T = TypeVar("_T")


def _generators(loader: DataLoader[Any]) -> list[torch.Generator]:
    """The torch generators that decide this loader's order (its own, its samplers'), once each."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, loader.sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def pass_snapshot(loader: DataLoader[Any]) -> dict[str, Any]:
    """The random states that decide the order of the pass about to start."""
    return {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in _generators(loader)]}


class _SkipFirst(Generic[_T]):
    """An index sampler that leaves out the first ``count`` entries of ``inner``."""

    def __init__(self, inner: Iterable[_T], count: int) -> None:
        self.inner = inner
        self.count = count
        self.active: _Skipping[_T] | None = None

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.count)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[_T]:
        self.active = _Skipping(iter(self.inner), self.count)
        return self.active


class _Skipping(Iterator[_T]):
    def __init__(self, inner: Iterator[_T], count: int) -> None:
        self._inner = inner
        self._count = count
        self._buffer: list[_T] = []
        self._primed = False

    def prime(self) -> None:
        """Skip the leading entries and hold the next one, so the sampler draws its seed now."""
        if self._primed:
            return
        self._primed = True
        for _ in itertools.islice(self._inner, self._count):
            pass
        self._buffer.extend(itertools.islice(self._inner, 1))

    def __next__(self) -> _T:
        self.prime()
        if self._buffer:
            return self._buffer.pop()
        return next(self._inner)


def resume_pass(loader: DataLoader[Any], position: int, snapshot: dict[str, Any]) -> Iterator[Any]:
    """An iterator over ``loader``'s current pass from batch ``position`` on (see the module doc)."""
    from handloom.data import _copy_loader

    live = torch.get_rng_state()
    generators = _generators(loader)
    torch.set_rng_state(snapshot["torch"])
    if len(generators) == len(snapshot["generators"]):
        for generator, state in zip(generators, snapshot["generators"], strict=True):
            generator.set_state(state)
    try:
        if isinstance(loader.dataset, IterableDataset):
            iterator = iter(loader)
            for _ in itertools.islice(iterator, position):
                pass
            return iterator
        skipper: _SkipFirst[Any]
        if loader.batch_sampler is not None:
            skipper = _SkipFirst(loader.batch_sampler, position)
            copy = _copy_loader(loader, batch_sampler=skipper)
        else:
            skipper = _SkipFirst(loader.sampler, position)
            copy = _copy_loader(loader, sampler=skipper)
        iterator = iter(copy)
        if skipper.active is not None:
            skipper.active.prime()
        return iterator
    finally:
        torch.set_rng_state(live)
