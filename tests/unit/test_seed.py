"""seed_everything and WorkerSeeder: reproducible draws, distinct worker streams, Lightning's env exports."""

from __future__ import annotations

import logging
import os
import pickle
import random
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from handloom import seed as seed_module
from handloom.seed import WorkerSeeder, current_seed, seed_everything, seed_workers_enabled


@pytest.fixture(autouse=True)
def _restore_seed_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("_current_seed", "_seed_workers"):
        monkeypatch.setattr(seed_module, name, getattr(seed_module, name))
    monkeypatch.delenv(seed_module.GLOBAL_SEED_VAR, raising=False)
    monkeypatch.delenv(seed_module.SEED_WORKERS_VAR, raising=False)
    yield


def draws() -> tuple[float, float, float]:
    return random.random(), torch.rand(()).item(), float(np.random.rand())


def test_same_seed_same_draws() -> None:
    seed_everything(123)
    first = draws()
    seed_everything(123)
    assert draws() == first
    seed_everything(124)
    other = draws()
    assert all(a != b for a, b in zip(first, other, strict=True))


def test_seed_and_workers_flag_are_recorded_and_exported_as_lightning_does() -> None:
    assert seed_everything(7, workers=True) == 7
    assert current_seed() == 7 and seed_workers_enabled() is True
    assert (os.environ["PL_GLOBAL_SEED"], os.environ["PL_SEED_WORKERS"]) == ("7", "1")
    seed_everything(8)
    assert current_seed() == 8 and seed_workers_enabled() is False
    assert (os.environ["PL_GLOBAL_SEED"], os.environ["PL_SEED_WORKERS"]) == ("8", "0")


def test_missing_seed_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(seed_module.GLOBAL_SEED_VAR, "99")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert seed_everything() == 99
    monkeypatch.setenv(seed_module.GLOBAL_SEED_VAR, "ninety")
    with pytest.raises(ValueError, match="PL_GLOBAL_SEED='ninety' is not an integer"):
        seed_everything()


def test_missing_seed_defaults_to_zero_and_warns_once() -> None:
    with pytest.warns(UserWarning, match="without a seed"):
        assert seed_everything() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert seed_everything() == 0
    assert current_seed() == 0


@pytest.mark.parametrize("bad", [-1, 2**32])
def test_out_of_range_seed_is_rejected(bad: int) -> None:
    with pytest.raises(ValueError, match=rf"seed_everything\(seed={bad}\)"):
        seed_everything(bad)


@pytest.mark.parametrize(
    ("given", "expected"),
    [("42", 42), (" 7 ", 7), (3.7, 3), (np.int64(5), 5), (torch.tensor(9), 9), (np.float32(2.9), 2)],
)
def test_seed_is_converted_with_int_like_lightning(given: object, expected: int) -> None:
    assert seed_everything(given) == expected  # type: ignore[arg-type]
    assert current_seed() == expected
    first = draws()
    seed_everything(expected)
    assert draws() == first


def test_fabric_seed_everything_converts_too() -> None:
    from handloom import Fabric

    assert Fabric.seed_everything("42") == 42
    assert Fabric.seed_everything(3.7, verbose=False) == 3


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        ("abc", ValueError, r"seed_everything\(seed='abc'\) is not a whole number"),
        ("3.7", ValueError, "is not a whole number"),  # int("3.7") fails in Lightning too
        ("-1", ValueError, r"seed_everything\(seed=-1\) is outside the range"),
        (2.0**32, ValueError, "is outside the range"),
        (float("nan"), ValueError, "has no integer value"),
        (float("inf"), ValueError, "has no integer value"),
        ([1], TypeError, "needs a number, got list"),
        (True, TypeError, "got a bool"),
    ],
)
def test_seeds_without_a_whole_number_are_rejected(bad: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        seed_everything(bad)  # type: ignore[arg-type]


def test_rank_offset_gives_each_rank_its_own_draws() -> None:
    seed_everything(5, rank=0)
    rank0 = draws()
    assert seed_everything(5, rank=1) == 5
    rank1 = draws()
    seed_everything(5, rank=0)
    assert draws() == rank0
    assert all(a != b for a, b in zip(rank0, rank1, strict=True))
    assert current_seed() == 5
    with pytest.raises(ValueError, match="rank=-1"):
        seed_everything(5, rank=-1)


def test_verbose_logs_at_info(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="handloom"):
        seed_everything(3, verbose=False)
        assert not caplog.records
        seed_everything(3)
    assert [r.getMessage() for r in caplog.records] == ["Seed set to 3"]


class RecordCalls:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, worker_id: int) -> None:
        self.calls.append(worker_id)


def test_worker_seeder_gives_distinct_reproducible_streams() -> None:
    results = {}
    for rank in range(3):
        for worker_id in range(4):
            WorkerSeeder(rank=rank, base_seed=42)(worker_id)
            results[rank, worker_id] = draws()
    for library in range(3):
        values = [r[library] for r in results.values()]
        assert len(set(values)) == len(values), f"library {library} repeats across (rank, worker)"
    WorkerSeeder(rank=2, base_seed=42)(1)
    assert draws() == results[2, 1]
    WorkerSeeder(rank=2, base_seed=43)(1)
    assert draws() != results[2, 1]


def test_worker_seeder_pickles_and_chains_to_the_user_function() -> None:
    user = RecordCalls()
    seeder = WorkerSeeder(rank=1, base_seed=9, worker_init_fn=user)
    clone = pickle.loads(pickle.dumps(seeder))
    assert (clone.rank, clone.base_seed) == (1, 9)
    seeder(3)
    expected = draws()
    clone(3)
    assert draws() == expected
    assert user.calls == [3]
    assert clone.worker_init_fn.calls == [3]


def test_worker_seeder_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="rank=-1"):
        WorkerSeeder(rank=-1, base_seed=0)
    with pytest.raises(TypeError, match="not callable"):
        WorkerSeeder(rank=0, base_seed=0, worker_init_fn=3)  # type: ignore[arg-type]


class RandomItems(Dataset[float]):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> float:
        return random.random()


def test_worker_seeder_in_real_workers_differs_by_rank_and_worker() -> None:
    def items(rank: int) -> list[float]:
        torch.manual_seed(0)  # every rank ran the same seed_everything
        loader = DataLoader(RandomItems(), batch_size=2, num_workers=2, worker_init_fn=WorkerSeeder(rank, 0))
        return [x for batch in loader for x in batch.tolist()]

    rank0, rank0_again, rank1 = items(0), items(0), items(1)
    assert rank0 == rank0_again
    # Batch 0 comes from worker 0 and batch 1 from worker 1.
    assert rank0[0] != rank0[2]
    assert set(rank0).isdisjoint(rank1)
