"""A resume restores what the state asks for, on every rank; collective saves are complete on return.

On 2-process gloo groups:

* DDP: ``RandomState`` in the state gives each rank back its own random streams (per-rank seeding
  stays per rank); a load right after a save reads the new file on every rank; ranks that name
  different paths get an error and nothing is written; a new script that loads only the weights
  of a run saved mid-epoch iterates its own loaders whole.
* FSDP: a save called by rank 0 alone does not pair with the other ranks' next save: the ranks
  get errors naming the paths (or the missing rank), and nothing is committed at either path.
"""

from __future__ import annotations

import functools
import json
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import handloom
from handloom import Fabric
from handloom.checkpoint import RandomState
from handloom.checkpoint import staging as staging_dirs
from handloom.strategies import DDPStrategy, FSDPStrategy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

BATCHES_PER_RANK = 10


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))


def _loader(offset: float = 0.0, shuffle: bool = False) -> DataLoader[Any]:
    """2 ranks x 10 batches of 2 samples; the sample values are ``offset + index``."""
    data = TensorDataset(torch.arange(4.0 * BATCHES_PER_RANK).add(offset).unsqueeze(1))
    return DataLoader(data, batch_size=2, shuffle=shuffle)


def _draws() -> torch.Tensor:
    """Numbers from every random stream a training step may use."""
    return torch.tensor(
        [random.random(), float(np.random.rand()), *torch.rand(3).tolist()], dtype=torch.float64
    )


def _gathered(fabric: Fabric, value: Any) -> list[Any]:
    return fabric.broadcast([fabric.all_gather(torch.tensor(value, dtype=torch.float64)).tolist()])[0]


def _saving_run(fabric: Fabric, directory: Path) -> dict[str, Any]:
    rank = fabric.global_rank
    results: dict[str, Any] = {}

    # Per-rank random streams survive a resume, each rank its own.
    handloom.seed_everything(7, rank=rank)
    fabric.save(directory / "rng.ckpt", {"rng": RandomState()})
    expected = _draws()
    handloom.seed_everything(123, rank=rank)  # whatever the resumed process did before the load
    fabric.load(directory / "rng.ckpt", {"rng": RandomState()})
    resumed = _draws()
    results["rng_equal"] = _gathered(fabric, float(torch.equal(resumed, expected)))
    everyone = fabric.all_gather(expected)
    assert isinstance(everyone, torch.Tensor)
    results["rng_distinct"] = not torch.equal(everyone[0], everyone[1])

    # Save, then load at once on every rank: each round reads the file of that round.
    rounds = []
    for index in range(5):
        weights = torch.full((4_000_000,), float(index))  # 16 MB: a write that takes a while
        fabric.save(directory / "round.ckpt", {"round": index, "weights": weights})
        data = fabric.load(directory / "round.ckpt")
        rounds.append(float(data["round"] == index and bool(data["weights"][-1] == index)))
    results["rounds"] = _gathered(fabric, rounds)

    # Ranks that name different paths: an error on every rank, nothing written.
    try:
        fabric.save(directory / f"rank-{rank}.ckpt", {"step": 1})
    except RuntimeError as err:
        results["paths_error"] = str(err)
    results["paths_written"] = sorted(p.name for p in directory.glob("rank-*"))

    # A run saved mid-epoch, with its loader and random states in the state.
    model = fabric.setup_module(_model())
    loader = fabric.setup_dataloaders(_loader(offset=100.0, shuffle=True))
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    fabric.save(directory / "run.ckpt", {"model": model, "loader": loader, "rng": RandomState(), "step": 3})
    return results


@pytest.fixture(scope="module")
def saving_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    directory = tmp_path_factory.mktemp("resume-follows-state")
    results = Fabric(accelerator="cpu", devices=2, strategy=DDPStrategy(start_method="fork")).launch(
        functools.partial(_saving_run, directory=directory)
    )
    return directory, results


def test_random_state_restores_each_ranks_own_streams(saving_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = saving_run
    assert results["rng_distinct"]  # per-rank seeding: the ranks draw different numbers
    assert results["rng_equal"] == [1.0, 1.0]  # and each continues its own after the resume


def test_a_load_right_after_a_save_reads_the_new_file_on_every_rank(
    saving_run: tuple[Path, dict[str, Any]],
) -> None:
    _, results = saving_run
    assert results["rounds"] == [[1.0] * 5, [1.0] * 5]


def test_ranks_that_name_different_paths_get_an_error_and_nothing_is_written(
    saving_run: tuple[Path, dict[str, Any]],
) -> None:
    directory, results = saving_run
    message = results["paths_error"]
    assert "different paths on different ranks" in message
    assert f"rank 0: {str(directory / 'rank-0.ckpt')!r}" in message
    assert f"rank 1: {str(directory / 'rank-1.ckpt')!r}" in message
    assert results["paths_written"] == []


def _new_script(fabric: Fabric, directory: Path) -> dict[str, Any]:
    """An evaluation and a fine-tune that load only the weights of the run saved mid-epoch."""
    model = fabric.setup_module(_model())
    eval_loader = fabric.setup_dataloaders(_loader())
    fabric.load(directory / "run.ckpt", {"model": model})
    finetune_loader = fabric.setup_dataloaders(_loader(shuffle=True))
    eval_batches = len(list(eval_loader))
    finetune_batches = len(list(finetune_loader))
    return {"eval": _gathered(fabric, eval_batches), "finetune": _gathered(fabric, finetune_batches)}


def test_loading_weights_leaves_the_loaders_of_a_new_script_alone(
    saving_run: tuple[Path, dict[str, Any]],
) -> None:
    directory, _ = saving_run
    results = Fabric(accelerator="cpu", devices=2, strategy=DDPStrategy(start_method="fork")).launch(
        functools.partial(_new_script, directory=directory)
    )
    assert results["eval"] == [BATCHES_PER_RANK] * 2  # every batch of the evaluation, on each rank
    assert results["finetune"] == [BATCHES_PER_RANK] * 2  # the fine-tune's first epoch is whole


def _rank_zero_then_everyone(fabric: Fabric, directory: Path) -> None:
    model = fabric.setup_module(_model())
    fabric.save(directory / "B", {"model": model, "step": 1})  # the previous checkpoint at B
    errors = []
    if fabric.global_rank == 0:
        try:
            fabric.save(directory / "A", {"model": model, "step": 2})
        except RuntimeError as err:
            errors.append(str(err))
    try:
        fabric.save(directory / "B", {"model": model, "step": 2})
    except RuntimeError as err:
        errors.append(str(err))
    (directory / f"errors-{fabric.global_rank}.json").write_text(json.dumps(errors))
    fabric.barrier()  # rank 1 waits here while rank 0's second save waits for it in vain


def test_a_sharded_save_by_rank_zero_alone_commits_nothing_at_either_path(tmp_path: Path) -> None:
    strategy = FSDPStrategy(
        auto_wrap_policy={nn.Linear}, start_method="fork", save_timeout=timedelta(seconds=5)
    )
    Fabric(accelerator="cpu", devices=2, strategy=strategy).launch(
        functools.partial(_rank_zero_then_everyone, directory=tmp_path)
    )
    zero = json.loads((tmp_path / "errors-0.json").read_text())
    one = json.loads((tmp_path / "errors-1.json").read_text())
    paths = f"rank 0: {str(tmp_path / 'A')!r}, rank 1: {str(tmp_path / 'B')!r}"
    assert len(one) == 1 and paths in one[0] and "Nothing was saved" in one[0]
    assert len(zero) == 2 and zero[0] == one[0]  # the same error on both ranks
    assert "rank(s) [1] did not call it within 5 s" in zero[1]  # rank 0's own save of B: rank 1 is gone
    assert not (tmp_path / "A").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["B", "errors-0.json", "errors-1.json"]
    assert staging_dirs.is_complete(tmp_path / "B")
    state: dict[str, Any] = {"step": 0}
    Fabric(accelerator="cpu", devices=1).load(tmp_path / "B", state)
    assert state["step"] == 1  # the previous checkpoint at B, unchanged
