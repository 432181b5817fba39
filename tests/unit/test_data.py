"""Sharding DataLoaders across ranks without a process group: one loader per simulated rank."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    WeightedRandomSampler,
    get_worker_info,
)

from handloom.data import SplitByRank, build_distributed_dataloader, set_sampler_epoch


class IndexDataset(Dataset[int]):
    """Item i is the integer i, so batches show exactly which samples a rank got."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


class RangeStream(IterableDataset[int]):
    """Yields 0..size-1; with workers, worker w yields every num_workers-th element from w."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.epochs: list[int] = []

    def __iter__(self) -> Iterator[int]:
        info = get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        return iter(range(start, self.size, step))

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


class SelfShardedStream(RangeStream):
    __handloom_sharded__ = True  # the old opt-out marker: now harmless, iterables are never split


def flatten(loader: DataLoader[Any]) -> list[int]:
    out: list[int] = []
    for batch in loader:
        out.extend(torch.as_tensor(batch).reshape(-1).tolist())
    return out


def per_rank(
    make: Callable[[], DataLoader[Any]], num_replicas: int, seed: int = 0, epoch: int | None = None
) -> list[list[int]]:
    """Build and iterate one sharded loader per rank; return each rank's samples in order."""
    results = []
    for rank in range(num_replicas):
        loader = build_distributed_dataloader(make(), num_replicas=num_replicas, rank=rank, seed=seed)
        if epoch is not None:
            set_sampler_epoch(loader, epoch)
        results.append(flatten(loader))
    return results


def interleave(shards: list[list[int]]) -> list[int]:
    """Undo a strided split: position i of the whole sequence is shards[i % n][i // n]."""
    return [x for group in zip(*shards, strict=True) for x in group]


# --- default samplers ------------------------------------------------------------------------


@pytest.mark.parametrize("num_replicas", [2, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_default_samplers_give_disjoint_covering_shards(
    num_replicas: int, shuffle: bool, drop_last: bool
) -> None:
    size, batch_size = 23, 2

    def make() -> DataLoader[Any]:
        return DataLoader(IndexDataset(size), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)

    loaders = [
        build_distributed_dataloader(make(), num_replicas=num_replicas, rank=r) for r in range(num_replicas)
    ]
    for loader in loaders:
        assert isinstance(loader.sampler, DistributedSampler)
        assert loader.sampler.shuffle is shuffle
    shards = [flatten(loader) for loader in loaders]
    counts = {len(shard) for shard in shards}
    assert len(counts) == 1, f"ranks got different numbers of samples: {shards}"
    for loader, shard in zip(loaders, shards, strict=True):
        assert len(loader) == math.ceil(len(shard) / batch_size)

    everything = [x for shard in shards for x in shard]
    if drop_last:
        per_rank_samples = size // num_replicas
        assert counts == {per_rank_samples // batch_size * batch_size}
        assert len(set(everything)) == len(everything), "shards overlap"
    else:
        assert set(everything) == set(range(size))
        padding = math.ceil(size / num_replicas) * num_replicas - size
        duplicates = sum(c - 1 for c in Counter(everything).values())
        assert duplicates == padding
    if shuffle:
        assert shards[0] != sorted(shards[0])
    else:
        assert shards[0][:3] == [0, num_replicas, 2 * num_replicas]


def test_shuffle_follows_the_epoch_and_matches_across_ranks() -> None:
    def make() -> DataLoader[Any]:
        return DataLoader(IndexDataset(40), batch_size=4, shuffle=True)

    epoch0 = interleave(per_rank(make, 4, seed=7, epoch=0))
    epoch0_again = interleave(per_rank(make, 4, seed=7, epoch=0))
    epoch1 = interleave(per_rank(make, 4, seed=7, epoch=1))
    other_seed = interleave(per_rank(make, 4, seed=8, epoch=0))
    # Ranks agree on one permutation: interleaving the shards gives every index once.
    assert sorted(epoch0) == sorted(epoch1) == list(range(40))
    assert epoch0 == epoch0_again
    assert epoch0 != epoch1
    assert epoch0 != other_seed


def test_original_loader_is_untouched() -> None:
    original = DataLoader(IndexDataset(10), batch_size=2, shuffle=True)
    sampler, batch_sampler = original.sampler, original.batch_sampler
    sharded = build_distributed_dataloader(original, num_replicas=2, rank=1)
    assert sharded is not original
    assert original.sampler is sampler and original.batch_sampler is batch_sampler
    assert sorted(flatten(original)) == list(range(10))
    assert len(flatten(sharded)) == 5


def test_loader_settings_are_kept() -> None:
    def collate(batch: list[int]) -> list[int]:
        return batch

    def init_worker(worker_id: int) -> None:
        pass

    generator = torch.Generator().manual_seed(3)
    loader = DataLoader(
        IndexDataset(12),
        batch_size=3,
        shuffle=True,
        num_workers=1,
        collate_fn=collate,
        pin_memory=False,
        drop_last=True,
        timeout=5,
        worker_init_fn=init_worker,
        generator=generator,
        prefetch_factor=3,
        persistent_workers=True,
    )
    sharded = build_distributed_dataloader(loader, num_replicas=2, rank=0)
    assert sharded.batch_size == 3 and sharded.drop_last is True
    assert sharded.collate_fn is collate and sharded.worker_init_fn is init_worker
    assert sharded.generator is generator
    assert sharded.num_workers == 1 and sharded.prefetch_factor == 3 and sharded.timeout == 5
    assert sharded.persistent_workers is True
    assert isinstance(sharded.batch_sampler, BatchSampler)
    assert sharded.batch_sampler.sampler is sharded.sampler
    assert sharded.batch_sampler.batch_size == 3 and sharded.batch_sampler.drop_last is True


def test_persistent_worker_iterator_is_not_shared_with_the_original() -> None:
    loader = DataLoader(IndexDataset(8), batch_size=2, num_workers=1, persistent_workers=True)
    assert flatten(loader) == list(range(8))  # creates the original's persistent iterator
    sharded = build_distributed_dataloader(loader, num_replicas=2, rank=1)
    assert flatten(sharded) == [1, 3, 5, 7]
    assert flatten(loader) == list(range(8))
    assert sharded._iterator is not loader._iterator


def test_unbatched_loader_shards_single_samples() -> None:
    shards = per_rank(lambda: DataLoader(IndexDataset(9), batch_size=None, shuffle=True), 3)
    assert sorted(interleave(shards)) == list(range(9))


# --- DataLoader subclasses -------------------------------------------------------------------


class ScalingLoader(DataLoader[Any]):
    """A subclass whose __init__ needs an argument DataLoader's constructor does not know."""

    def __init__(self, dataset: Dataset[Any], scale: int, *, batch_size: int) -> None:
        super().__init__(dataset, batch_size=batch_size, shuffle=True)
        self.scale = scale

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            yield batch * self.scale


def test_subclass_with_required_argument_keeps_class_and_behaviour() -> None:
    shards = per_rank(lambda: ScalingLoader(IndexDataset(12), 10, batch_size=2), 3)
    sharded = build_distributed_dataloader(
        ScalingLoader(IndexDataset(12), 10, batch_size=2), num_replicas=3, rank=0
    )
    assert type(sharded) is ScalingLoader
    assert sharded.scale == 10
    everything = [x for shard in shards for x in shard]
    assert sorted(everything) == [10 * i for i in range(12)]


# --- batch samplers --------------------------------------------------------------------------


class ReversedBatchSampler(BatchSampler):
    """A BatchSampler subclass with its own argument and its own batching order."""

    def __init__(self, sampler: Sampler[int], batch_size: int, tag: str) -> None:
        super().__init__(sampler, batch_size, drop_last=False)
        self.tag = tag

    def __iter__(self) -> Iterator[list[int]]:
        for batch in super().__iter__():
            yield batch[::-1]


def test_custom_batch_sampler_with_sampler_gets_a_distributed_sampler() -> None:
    def make() -> DataLoader[Any]:
        dataset = IndexDataset(12)
        return DataLoader(dataset, batch_sampler=ReversedBatchSampler(SequentialSampler(dataset), 2, "t"))

    loader = build_distributed_dataloader(make(), num_replicas=2, rank=0)
    assert type(loader.batch_sampler) is ReversedBatchSampler
    assert loader.batch_sampler.tag == "t"
    assert isinstance(loader.batch_sampler.sampler, DistributedSampler)
    assert loader.batch_sampler.sampler.shuffle is False
    assert [b.tolist() for b in loader] == [[2, 0], [6, 4], [10, 8]]
    shards = per_rank(make, 2)
    assert sorted(shards[0] + shards[1]) == list(range(12))


def test_explicit_plain_batch_sampler_keeps_its_shuffle() -> None:
    # loader.sampler is a default SequentialSampler here; the real index source is the batch
    # sampler's RandomSampler, and its shuffle must survive.
    def make() -> DataLoader[Any]:
        dataset = IndexDataset(16)
        return DataLoader(dataset, batch_sampler=BatchSampler(RandomSampler(dataset), 4, drop_last=False))

    loader = build_distributed_dataloader(make(), num_replicas=2, rank=0)
    assert isinstance(loader.batch_sampler.sampler, DistributedSampler)
    assert loader.batch_sampler.sampler.shuffle is True
    order = interleave(per_rank(make, 2, seed=1))
    assert sorted(order) == list(range(16)) and order != list(range(16))


class FixedBatches:
    """A batch sampler with no .sampler: just a list of batches."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches
        self.epochs: list[int] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


def test_batch_sampler_without_sampler_is_sharded_by_batch() -> None:
    batches = [[i, i + 100] for i in range(7)]
    loaders = [
        build_distributed_dataloader(
            DataLoader(IndexDataset(200), batch_sampler=FixedBatches(batches)), num_replicas=3, rank=r
        )
        for r in range(3)
    ]
    got = [[b.tolist() for b in loader] for loader in loaders]
    # Batch 6 is an incomplete group of 3 and is dropped on every rank.
    assert got == [[batches[0], batches[3]], [batches[1], batches[4]], [batches[2], batches[5]]]
    assert [len(loader) for loader in loaders] == [2, 2, 2]
    set_sampler_epoch(loaders[0], 5)
    inner = loaders[0].batch_sampler.batch_sampler  # type: ignore[union-attr]
    assert inner.epochs == [5]


# --- other samplers --------------------------------------------------------------------------


def test_weighted_sampler_gives_disjoint_slices_of_one_sequence() -> None:
    weights = torch.linspace(0.1, 1.0, 30)
    user_generator = torch.Generator().manual_seed(123)

    def make() -> DataLoader[Any]:
        sampler = WeightedRandomSampler(weights, num_samples=24, generator=user_generator)
        return DataLoader(IndexDataset(30), batch_size=3, sampler=sampler)

    shards = []
    for rank in range(3):
        torch.manual_seed(1000 + rank)  # ranks' global RNGs differ; the result must not
        loader = build_distributed_dataloader(make(), num_replicas=3, rank=rank, seed=5)
        set_sampler_epoch(loader, 2)
        shards.append(flatten(loader))
    assert [len(s) for s in shards] == [8, 8, 8]
    expected = list(WeightedRandomSampler(weights, 24, generator=torch.Generator().manual_seed(5 + 2)))
    assert interleave(shards) == expected
    # The user's generator was put back after each draw.
    assert make().sampler.generator is user_generator  # type: ignore[union-attr]
    assert user_generator.initial_seed() == 123

    set_sampler_epoch(loader, 3)
    assert flatten(loader) != shards[2]


class ReverseSampler(Sampler[int]):
    def __init__(self, size: int) -> None:
        self.size = size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.size - 1, -1, -1))

    def __len__(self) -> int:
        return self.size


@pytest.mark.parametrize("drop_last", [False, True])
def test_user_sampler_is_split_like_distributed_sampler(drop_last: bool) -> None:
    def make() -> DataLoader[Any]:
        return DataLoader(IndexDataset(10), batch_size=1, sampler=ReverseSampler(10), drop_last=drop_last)

    shards = per_rank(make, 4)
    if drop_last:
        assert shards == [[9, 5], [8, 4], [7, 3], [6, 2]]
    else:  # padded from the start of the sequence so every rank gets 3
        assert shards == [[9, 5, 1], [8, 4, 0], [7, 3, 9], [6, 2, 8]]
    loader = build_distributed_dataloader(make(), num_replicas=4, rank=0)
    assert len(loader) == len(shards[0])


# --- iterable datasets -----------------------------------------------------------------------


@pytest.mark.parametrize("num_replicas", [2, 3, 4])
def test_split_by_rank_shards_are_equal_and_disjoint(num_replicas: int) -> None:
    size = 23
    loaders = [
        build_distributed_dataloader(
            DataLoader(SplitByRank(RangeStream(size)), batch_size=2), num_replicas=num_replicas, rank=r
        )
        for r in range(num_replicas)
    ]
    shards = [flatten(loader) for loader in loaders]
    per_rank_count = size // num_replicas
    assert [len(s) for s in shards] == [per_rank_count] * num_replicas
    assert shards[1][:2] == [1, 1 + num_replicas]
    everything = [x for s in shards for x in s]
    assert sorted(everything) == list(range(per_rank_count * num_replicas))
    assert len(loaders[0]) == math.ceil(per_rank_count / 2)


def test_split_by_rank_with_workers() -> None:
    size, num_replicas = 29, 2
    shards = per_rank(
        lambda: DataLoader(SplitByRank(RangeStream(size)), batch_size=3, num_workers=2), num_replicas
    )
    assert len(shards[0]) == len(shards[1])
    everything = [x for s in shards for x in s]
    assert len(set(everything)) == len(everything), "ranks or workers overlap"
    # Worker 0 streams 15 elements (7 full pairs), worker 1 streams 14 (7 pairs).
    assert len(everything) == 28


def test_iterable_dataset_is_not_split_unless_wrapped() -> None:
    # As in Lightning: an IterableDataset shards itself by rank, so handloom must not split it again.
    for stream in (RangeStream(10), SelfShardedStream(10)):
        loader = DataLoader(stream, batch_size=2)
        assert build_distributed_dataloader(loader, num_replicas=2, rank=1) is loader
        assert flatten(loader) == list(range(10))
    unsplit = DataLoader(SplitByRank(RangeStream(10)), batch_size=2)
    assert flatten(unsplit) == list(range(10))  # before setup the wrapper yields everything
    assert build_distributed_dataloader(unsplit, num_replicas=1, rank=0) is unsplit
    with pytest.raises(TypeError, match=r"SplitByRank\(IndexDataset\(...\)\) needs an IterableDataset"):
        SplitByRank(IndexDataset(4))  # type: ignore[arg-type]


def test_split_by_rank_already_sharded() -> None:
    loader = DataLoader(SplitByRank(RangeStream(10)), batch_size=2)
    once = build_distributed_dataloader(loader, num_replicas=2, rank=1)
    assert flatten(once) == [1, 3, 5, 7, 9] and flatten(loader) == list(range(10))
    assert build_distributed_dataloader(once, num_replicas=2, rank=1) is once
    with pytest.raises(ValueError, match="already sharded with num_replicas=2, rank=1"):
        build_distributed_dataloader(once, num_replicas=3, rank=1)


def test_set_sampler_epoch_reaches_iterable_dataset() -> None:
    stream = RangeStream(10)
    loader = build_distributed_dataloader(DataLoader(SplitByRank(stream)), num_replicas=2, rank=0)
    set_sampler_epoch(loader, 4)
    plain = DataLoader(RangeStream(10))
    set_sampler_epoch(plain, 5)
    assert stream.epochs == [4] and plain.dataset.epochs == [5]  # type: ignore[attr-defined]


# --- unchanged loaders and errors ------------------------------------------------------------


def test_single_replica_shuffle_is_seeded_not_drawn_from_the_global_rng() -> None:
    # One data-parallel replica (tensor parallelism alone): every process of the group must get
    # the same order whatever its global RNG did, and the order must change per epoch.
    def order(seed_offset: int, epoch: int) -> list[int]:
        torch.manual_seed(100 + seed_offset)  # the processes' global RNGs differ
        loader = build_distributed_dataloader(
            DataLoader(IndexDataset(20), batch_size=4, shuffle=True), num_replicas=1, rank=0, seed=3
        )
        set_sampler_epoch(loader, epoch)
        return flatten(loader)

    assert order(0, 0) == order(1, 0) and sorted(order(0, 0)) == list(range(20))
    assert order(0, 0) != order(0, 1) and order(0, 0) != list(range(20))
    loader = DataLoader(IndexDataset(10), batch_size=2, shuffle=True)
    single = build_distributed_dataloader(loader, num_replicas=1, rank=0)
    assert isinstance(single.sampler, DistributedSampler) and single.sampler.num_replicas == 1
    sequential = build_distributed_dataloader(
        DataLoader(IndexDataset(10), batch_size=3), num_replicas=1, rank=0
    )
    assert flatten(sequential) == list(range(10)) and len(sequential) == 4
    # A custom sampler drawing from a generator is seeded with seed + epoch too.
    weights = torch.ones(12)

    def weighted(seed_offset: int) -> list[int]:
        torch.manual_seed(seed_offset)
        sampler = WeightedRandomSampler(weights, num_samples=12)
        return flatten(
            build_distributed_dataloader(
                DataLoader(IndexDataset(12), sampler=sampler), num_replicas=1, rank=0
            )
        )

    assert weighted(0) == weighted(1)
    # Nothing to seed: a batch sampler without .sampler is left as it is.
    fixed = DataLoader(IndexDataset(4), batch_sampler=FixedBatches([[0, 1], [2, 3]]))
    assert build_distributed_dataloader(fixed, num_replicas=1, rank=0) is fixed


def test_distributed_sampler_is_left_alone() -> None:
    dataset = IndexDataset(10)
    distributed = DataLoader(dataset, sampler=DistributedSampler(dataset, num_replicas=2, rank=0))
    assert build_distributed_dataloader(distributed, num_replicas=2, rank=0) is distributed
    sharded = build_distributed_dataloader(
        DataLoader(dataset, sampler=ReverseSampler(10)), num_replicas=2, rank=0
    )
    assert build_distributed_dataloader(sharded, num_replicas=2, rank=0) is sharded


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_replicas": 0, "rank": 0}, ValueError, r"num_replicas=0\)"),
        ({"num_replicas": 2, "rank": 2}, ValueError, r"rank=2\) is outside \[0, 1\]"),
        ({"num_replicas": 2, "rank": -1}, ValueError, r"rank=-1\)"),
        ({"num_replicas": 2.0, "rank": 0}, TypeError, r"num_replicas=2.0\) needs an int"),
        ({"num_replicas": 2, "rank": True}, TypeError, r"rank=True\) needs an int"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        build_distributed_dataloader(DataLoader(IndexDataset(4)), **kwargs)


def test_non_dataloader_is_rejected() -> None:
    with pytest.raises(TypeError, match="got a list, not a DataLoader"):
        build_distributed_dataloader([1, 2], num_replicas=2, rank=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs a DataLoader"):
        set_sampler_epoch([1, 2], 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epoch=-1"):
        set_sampler_epoch(DataLoader(IndexDataset(4)), -1)
