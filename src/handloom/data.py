"""Make a DataLoader distributed: each rank gets its own shard of the batches.

The loader is never rebuilt through its constructor. :func:`build_distributed_dataloader`
shallow-copies the loader object and swaps the sampler, batch sampler or dataset on the copy, so
DataLoader subclasses with their own ``__init__`` arguments and methods keep working no matter
when or where they were created.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Sized
from typing import Any, TypeVar

import torch
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

__all__ = ["SplitByRank", "build_distributed_dataloader", "set_sampler_epoch"]

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)


def build_distributed_dataloader(
    loader: DataLoader[_T], *, num_replicas: int, rank: int, seed: int = 0
) -> DataLoader[_T]:
    """Return a loader whose batches on ``rank`` are that rank's shard of ``loader``'s data.

    The original loader is left untouched; the result is a shallow copy of it (same class,
    same ``batch_size``, ``collate_fn``, workers, ``generator`` and everything else) with
    only the sampling replaced:

    * Default samplers (``shuffle=True`` / ``False``): a ``DistributedSampler`` with the same
      ``shuffle``, the given ``seed`` and ``drop_last=loader.drop_last``. Without ``drop_last``
      the last samples are repeated so every rank gets the same count, as ``DistributedSampler``
      does.
    * A batch sampler with a ``.sampler`` attribute: a shallow copy of it whose ``.sampler``
      is replaced as above. State the batch sampler derived from its old sampler in ``__init__``
      (bucket tables, cached lengths) is not recomputed.
    * A batch sampler without ``.sampler``: rank ``r`` takes batches ``r, r + n, r + 2n, ...``
      of the batch sampler's sequence; an incomplete last group of ``n`` batches is dropped so
      every rank yields the same number of batches.
    * Any other sampler (``WeightedRandomSampler``, your own): every rank draws the full index
      sequence and takes a strided slice of it, padding or dropping the tail like
      ``DistributedSampler``. A sampler with a ``generator`` attribute is given a generator
      seeded with ``seed + epoch`` for each pass, so all ranks draw the same sequence. A sampler
      that draws from the global RNG must be seeded identically on every rank.
    * An ``IterableDataset`` is left alone, as in Lightning: it must split its data by rank
      itself. Wrap it in :class:`SplitByRank` to have handloom split it instead.

    With ``num_replicas == 1`` (one data-parallel replica, for example tensor parallelism alone)
    samplers are still replaced, with ``DistributedSampler(num_replicas=1)`` for the default
    ones: the order then comes from ``seed`` and the epoch, never from a process's global RNG,
    so every process of a tensor-parallel group gets the same batches. The loader is returned
    unchanged when it already uses a ``DistributedSampler`` (or was already sharded by this
    function), when its dataset is an ``IterableDataset`` not wrapped in :class:`SplitByRank`,
    and, with one replica, when its batch sampler has no ``.sampler``.

    Call :func:`set_sampler_epoch` before each epoch to get a new shuffle.

    Args:
        loader: The DataLoader to shard.
        num_replicas: The number of processes sharing the data (the data-parallel world size).
        rank: This process's index among them, in ``[0, num_replicas)``.
        seed: The shuffling seed; must be the same on every rank.

    Returns:
        A DataLoader of the same class as ``loader``, or ``loader`` itself when nothing changes.

    Raises:
        TypeError: ``loader`` is not a DataLoader, or an argument is not an int.
        ValueError: ``num_replicas`` < 1, ``rank`` out of range, or the dataset was already
            sharded for a different ``num_replicas``/``rank``.
    """
    _check_arguments(loader, num_replicas, rank, seed)
    if isinstance(loader.dataset, IterableDataset):
        return _maybe_split_iterable(loader, num_replicas, rank)

    batch_sampler = loader.batch_sampler
    if batch_sampler is None:  # batch_size=None: the sampler yields single indices
        sampler = _maybe_distribute(
            loader.sampler,
            loader,
            num_replicas=num_replicas,
            rank=rank,
            seed=seed,
            drop_last=loader.drop_last,
        )
        return loader if sampler is None else _copy_loader(loader, sampler=sampler)
    if isinstance(batch_sampler, _ShardedBatchSampler):
        return loader

    inner = getattr(batch_sampler, "sampler", None)
    if inner is None:
        if num_replicas == 1:  # nothing to split and no sampler whose RNG handloom could seed
            return loader
        return _copy_loader(loader, batch_sampler=_ShardedBatchSampler(batch_sampler, num_replicas, rank))
    drop_last = getattr(batch_sampler, "drop_last", loader.drop_last)
    new_inner = _maybe_distribute(
        inner, loader, num_replicas=num_replicas, rank=rank, seed=seed, drop_last=bool(drop_last)
    )
    if new_inner is None:
        return loader
    new_batch_sampler: Any = copy.copy(batch_sampler)
    try:
        new_batch_sampler.sampler = new_inner
    except AttributeError as error:
        raise TypeError(
            f"{type(batch_sampler).__name__}.sampler cannot be assigned ({error}), so its batches "
            "cannot be sharded by replacing the sampler. Make `sampler` a plain attribute, or pass a "
            "DistributedSampler to it yourself."
        ) from error
    replacements: dict[str, object] = {"batch_sampler": new_batch_sampler}
    if loader.sampler is inner:  # the default layout: keep loader.sampler truthful
        replacements["sampler"] = new_inner
    return _copy_loader(loader, **replacements)


def set_sampler_epoch(loader: DataLoader[Any], epoch: int) -> None:
    """Tell the loader's samplers (and a sharded iterable dataset) which epoch starts.

    Calls ``set_epoch(epoch)`` on ``loader.sampler``, ``loader.batch_sampler``, the batch
    sampler's ``.sampler`` and an ``IterableDataset``, wherever that method exists. Call it
    before iterating, with a counter you save in checkpoints, so shuffles differ per epoch and
    a resumed run continues the sequence.

    Args:
        loader: A DataLoader, usually one returned by :func:`build_distributed_dataloader`.
        epoch: The epoch about to start, ``>= 0``.

    Raises:
        TypeError: ``loader`` is not a DataLoader or ``epoch`` is not an int.
        ValueError: ``epoch`` is negative.
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(f"set_sampler_epoch() needs a DataLoader, got {type(loader).__name__}.")
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise TypeError(f"set_sampler_epoch(epoch={epoch!r}) needs an int. Pass the epoch counter.")
    if epoch < 0:
        raise ValueError(f"set_sampler_epoch(epoch={epoch}) is negative. Count epochs from 0.")
    candidates: list[object] = [
        loader.sampler,
        loader.batch_sampler,
        getattr(loader.batch_sampler, "sampler", None),
    ]
    if isinstance(loader.dataset, IterableDataset):
        candidates.append(loader.dataset)
    seen: set[int] = set()
    for obj in candidates:
        set_epoch = getattr(obj, "set_epoch", None)
        if obj is not None and id(obj) not in seen and callable(set_epoch):
            seen.add(id(obj))
            set_epoch(epoch)


class _ShardedSampler(Sampler[int]):
    """Give each rank a strided slice of one index sequence drawn from any sampler.

    Every rank iterates the whole wrapped sampler. If it has a ``generator`` attribute (None
    or a ``torch.Generator``), that is swapped for one seeded with ``seed + epoch`` during the
    draw and restored after, so all ranks see the same sequence.
    """

    def __init__(
        self, sampler: Iterable[int], num_replicas: int, rank: int, seed: int, drop_last: bool
    ) -> None:
        self.sampler = sampler
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def __len__(self) -> int:
        total = _length(self.sampler)
        if self.drop_last:
            return total // self.num_replicas
        return math.ceil(total / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        indices = self._draw()
        if self.drop_last:
            indices = indices[: len(indices) - len(indices) % self.num_replicas]
        elif indices:
            # Repeat from the start, as DistributedSampler does, so every rank gets the same count.
            padding = -len(indices) % self.num_replicas
            indices += (indices * math.ceil(padding / len(indices)))[:padding]
        return iter(indices[self.rank :: self.num_replicas])

    def set_epoch(self, epoch: int) -> None:
        """Use ``seed + epoch`` for the next pass and forward the epoch to the wrapped sampler."""
        self.epoch = epoch
        inner_set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(inner_set_epoch):
            inner_set_epoch(epoch)

    def _draw(self) -> list[int]:
        if not hasattr(self.sampler, "generator"):
            return list(self.sampler)
        original = self.sampler.generator
        if original is not None and not isinstance(original, torch.Generator):
            return list(self.sampler)  # someone else's RNG type: leave it to the user
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        self.sampler.generator = generator
        try:
            return list(self.sampler)
        finally:
            self.sampler.generator = original


class _ShardedBatchSampler(Sampler[list[int]]):
    """Give rank ``r`` batches ``r, r + n, ...`` of a batch sampler, in full groups of ``n`` only."""

    def __init__(self, batch_sampler: Iterable[list[int]], num_replicas: int, rank: int) -> None:
        self.batch_sampler = batch_sampler
        self.num_replicas = num_replicas
        self.rank = rank

    def __len__(self) -> int:
        return _length(self.batch_sampler) // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        return _take_every(self.batch_sampler, self.num_replicas, self.rank)

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the wrapped batch sampler if it has ``set_epoch``."""
        inner_set_epoch = getattr(self.batch_sampler, "set_epoch", None)
        if callable(inner_set_epoch):
            inner_set_epoch(epoch)


class SplitByRank(IterableDataset[_T_co]):
    """Opt in to handloom splitting an ``IterableDataset`` between data-parallel ranks.

    Lightning never splits an ``IterableDataset``: each rank iterates whatever its dataset
    yields, so a dataset must shard itself by rank. handloom does the same by default. Wrap a
    dataset that yields the same sequence on every rank in ``SplitByRank`` and
    ``fabric.setup_dataloaders`` (or :func:`build_distributed_dataloader`) makes rank ``r`` of
    ``n`` keep element ``r`` of each consecutive group of ``n`` elements; an incomplete last
    group is dropped so every rank gets the same count. Before it is set up, it yields every
    element. Splitting between DataLoader workers stays the dataset's job, as in plain PyTorch
    (``torch.utils.data.get_worker_info``).

    Args:
        dataset: The iterable dataset to split.

    Raises:
        TypeError: ``dataset`` is not an ``IterableDataset``.

    Example::

        loader = DataLoader(SplitByRank(MyStream()), batch_size=8)
        loader = fabric.setup_dataloaders(loader)   # each rank now sees 1/world_size of the stream
    """

    def __init__(self, dataset: IterableDataset[_T_co]) -> None:
        if not isinstance(dataset, IterableDataset):
            raise TypeError(
                f"SplitByRank({type(dataset).__name__}(...)) needs an IterableDataset. A map-style "
                "dataset is split by its sampler already: pass it to the DataLoader directly."
            )
        self.dataset = dataset
        # Set on the copy that build_distributed_dataloader makes; (1, 0) yields everything.
        self.num_replicas = 1
        self.rank = 0

    def __iter__(self) -> Iterator[_T_co]:
        return _take_every(self.dataset, self.num_replicas, self.rank)

    def __len__(self) -> int:
        return _length(self.dataset) // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the wrapped dataset if it has ``set_epoch``.

        With ``persistent_workers=True`` the workers hold their own copies of the dataset and do
        not see this call; that is PyTorch's behaviour for any dataset attribute.
        """
        inner_set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(inner_set_epoch):
            inner_set_epoch(epoch)


def _take_every(items: Iterable[_T], num_replicas: int, rank: int) -> Iterator[_T]:
    """Yield item ``rank`` of each complete group of ``num_replicas`` consecutive items."""
    mine: list[_T] = []
    for position, item in enumerate(items):
        slot = position % num_replicas
        if slot == rank:
            mine = [item]
        if slot == num_replicas - 1:
            yield mine[0]


def _maybe_distribute(
    sampler: Iterable[Any],
    loader: DataLoader[Any],
    *,
    num_replicas: int,
    rank: int,
    seed: int,
    drop_last: bool,
) -> Sampler[Any] | None:
    """Return the sampler that shards ``sampler``, or ``None`` when it is already distributed."""
    if isinstance(sampler, DistributedSampler | _ShardedSampler):
        return None
    if _is_plain(sampler, loader):
        return DistributedSampler(
            loader.dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=type(sampler) is RandomSampler,
            seed=seed,
            drop_last=drop_last,
        )
    return _ShardedSampler(sampler, num_replicas, rank, seed, drop_last)


def _is_plain(sampler: Iterable[Any], loader: DataLoader[Any]) -> bool:
    """True for a Random/SequentialSampler that visits each element of ``loader.dataset`` once."""
    dataset: object = loader.dataset
    if type(sampler) is SequentialSampler:
        return sampler.data_source is dataset
    if type(sampler) is RandomSampler:
        return (
            sampler.data_source is dataset
            and not sampler.replacement
            and sampler.num_samples == _length(loader.dataset)
        )
    return False


def _maybe_split_iterable(loader: DataLoader[_T], num_replicas: int, rank: int) -> DataLoader[_T]:
    """Split a :class:`SplitByRank` dataset for ``rank``; leave any other iterable dataset alone."""
    dataset = loader.dataset
    if not isinstance(dataset, SplitByRank) or (dataset.num_replicas, dataset.rank) == (num_replicas, rank):
        return loader
    if dataset.num_replicas != 1:
        raise ValueError(
            f"build_distributed_dataloader(num_replicas={num_replicas}, rank={rank}) got a loader "
            f"already sharded with num_replicas={dataset.num_replicas}, rank={dataset.rank}. "
            "Pass the original, unsharded loader."
        )
    split = copy.copy(dataset)
    split.num_replicas, split.rank = num_replicas, rank
    return _copy_loader(loader, dataset=split)


def _copy_loader(loader: DataLoader[_T], **replacements: object) -> DataLoader[_T]:
    """Shallow-copy ``loader`` and set ``replacements`` on the copy.

    ``DataLoader.__setattr__`` refuses to rebind ``dataset``, ``sampler``, ``batch_sampler``,
    ``batch_size``, ``drop_last`` and ``persistent_workers`` once ``__init__`` has run, to stop
    users changing a loader whose iterator may already exist. The copy has no iterator yet, so
    ``object.__setattr__`` skips that guard (and any subclass ``__setattr__``) on the copy only.
    ``_index_sampler`` and ``_auto_collation`` are properties computed from ``batch_sampler``
    and ``sampler``, so they follow the new values by themselves.
    """
    new = copy.copy(loader)
    for name, value in replacements.items():
        object.__setattr__(new, name, value)
    # copy.copy shares the original's persistent-worker iterator, which was built from the old
    # samplers; the copy must start its own. The cached IterableDataset length is stale too.
    new._iterator = None
    new._IterableDataset_len_called = None
    return new


def _length(obj: object) -> int:
    if not isinstance(obj, Sized):
        raise TypeError(
            f"{type(obj).__name__} has no len(), so the size of each rank's shard is unknown. "
            "Give it a __len__, or do not call len() on the loader."
        )
    return len(obj)


def _check_arguments(loader: object, num_replicas: object, rank: object, seed: object) -> None:
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"build_distributed_dataloader() got a {type(loader).__name__}, not a DataLoader. "
            "Pass a torch.utils.data.DataLoader (or a subclass of it)."
        )
    for name, value in (("num_replicas", num_replicas), ("rank", rank), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"build_distributed_dataloader({name}={value!r}) needs an int.")
    assert isinstance(num_replicas, int) and isinstance(rank, int)
    if num_replicas < 1:
        raise ValueError(
            f"build_distributed_dataloader(num_replicas={num_replicas}) has no processes to share "
            "the data. Pass the data-parallel world size, which is at least 1."
        )
    if not 0 <= rank < num_replicas:
        raise ValueError(
            f"build_distributed_dataloader(rank={rank}) is outside [0, {num_replicas - 1}] for "
            f"num_replicas={num_replicas}. Pass this process's data-parallel rank."
        )
