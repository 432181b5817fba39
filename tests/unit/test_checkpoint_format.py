"""What a checkpoint file holds, and what a load touches: exactly what the user's state names.

* ``fabric.save`` writes exactly the user's keys: a plain state dict stays a plain state dict.
* Checkpoints of earlier handloom versions (with a ``"handloom"`` resume entry) still load.
* A load repositions only the loaders in its state; a DataLoader with its own ``state_dict`` is
  restored through it alone; a program that skips batches itself sees each batch once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from handloom import Fabric
from handloom.checkpoint import RandomState, resume


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _data(num_batches: int, offset: float = 0.0) -> TensorDataset:
    return TensorDataset(torch.arange(2.0 * num_batches).add(offset).unsqueeze(1))


def _values(loader: Any) -> list[float]:
    return [value for (batch,) in loader for value in batch.flatten().tolist()]


# --- the file holds exactly the user's keys -----------------------------------------------------------


def test_a_saved_state_dict_is_exactly_that_dict(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = fabric.setup_module(_model())
    fabric.save(tmp_path / "weights.pt", model.state_dict())
    data = torch.load(tmp_path / "weights.pt", weights_only=True)
    expected = model.state_dict()
    assert list(data) == list(expected)
    assert all(torch.equal(data[key], expected[key]) for key in expected)
    plain = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    plain.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))  # no unexpected key
    assert torch.equal(plain[0].weight, model.module[0].weight)


def test_a_saved_state_holds_only_its_own_keys(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = fabric.setup_module(_model())
    fabric.save(tmp_path / "c.ckpt", {"model": model, "step": 3})
    data = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert set(data) == {"model", "step"}
    assert data["step"] == 3 and list(data["model"]) == list(model.state_dict())


def _legacy_entry() -> dict[str, Any]:
    """The resume entry earlier handloom versions saved under "handloom" (format 1)."""
    progress = {"passes": 1, "position": 3, "finished": False, "length": 5, "snapshot": None}
    return {
        "format": 1,
        "meta": {"handloom_version": "0.1.0", "torch_version": str(torch.__version__), "world_size": 1,
                 "strategy": "SingleDeviceStrategy", "precision": "32-true", "time": 0.0},
        "ranks": {0: {"rng": resume.capture_rng(), "loaders": [progress]}},
        "scaler": None,
    }  # fmt: skip


def test_a_checkpoint_of_an_earlier_handloom_still_loads(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = fabric.setup_module(_model())
    path = tmp_path / "old.ckpt"
    torch.save({"model": model.state_dict(), "step": 3, "extra": 1, "handloom": _legacy_entry()}, path)

    again = Fabric(accelerator="cpu", devices=1)
    restored = again.setup_module(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    loader = again.setup_dataloaders(DataLoader(_data(5), batch_size=2))
    state: dict[str, Any] = {"model": restored, "step": 0}
    assert again.load(path, state) == {"extra": 1}  # the old resume entry is dropped silently
    assert state["step"] == 3 and torch.equal(restored.module[0].weight, model.module[0].weight)
    assert len(list(loader)) == 5  # and nothing of it is applied
    assert set(again.load(path)) == {"model", "step", "extra"}
    asked: dict[str, Any] = {"handloom": None}
    again.load(path, asked)  # the key is the user's when the state asks for it
    assert asked["handloom"]["format"] == 1
    with pytest.raises(
        ValueError, match=r"got a checkpoint written by fabric\.save \(entries \['extra', 'model'"
    ):
        again.load_raw(path, restored)


def test_load_raw_of_a_fabric_checkpoint_still_says_to_use_load(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = fabric.setup_module(_model())
    fabric.save(tmp_path / "c.ckpt", {"model": model, "step": 3})
    with pytest.raises(ValueError, match=r"not a plain state_dict. Load it with fabric\.load"):
        fabric.load_raw(tmp_path / "c.ckpt", model)
    fabric.save(tmp_path / "w.pt", model.state_dict())
    fabric.load_raw(tmp_path / "w.pt", model)  # what fabric.save wrote from a state dict is one


# --- a load touches only the loaders in its state ------------------------------------------------------


def _save_mid_epoch(path: Path) -> None:
    """A training run stopped after 3 of its 10 batches, saved with its loader in the state."""
    fabric = Fabric(accelerator="cpu", devices=1)
    model = fabric.setup_module(_model())
    loader = fabric.setup_dataloaders(DataLoader(_data(10, offset=100.0), batch_size=2, shuffle=True))
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    fabric.save(path, {"model": model, "loader": loader, "rng": RandomState(), "step": 3})


def test_loading_weights_leaves_the_loaders_of_a_new_script_alone(tmp_path: Path) -> None:
    _save_mid_epoch(tmp_path / "run.ckpt")

    evaluation = Fabric(accelerator="cpu", devices=1)
    model = evaluation.setup_module(_model())
    eval_loader = evaluation.setup_dataloaders(DataLoader(_data(10), batch_size=2))
    evaluation.load(tmp_path / "run.ckpt", {"model": model})
    assert _values(eval_loader) == [float(i) for i in range(20)]  # all 10 batches

    finetune = Fabric(accelerator="cpu", devices=1)
    model = finetune.setup_module(_model())
    finetune.load(tmp_path / "run.ckpt", {"model": model})
    train_loader = finetune.setup_dataloaders(DataLoader(_data(6), batch_size=2, shuffle=True))
    assert sorted(_values(train_loader)) == [float(i) for i in range(12)]  # the first epoch is whole


class _OwnResumeLoader(DataLoader[Any]):
    """A DataLoader that resumes itself (like torchdata's StatefulDataLoader): skips what it had yielded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.yielded = 0
        self.loaded: list[dict[str, Any]] = []

    def __iter__(self) -> Iterator[Any]:
        skip, self.yielded = self.yielded, 0
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                self.yielded = index + 1
                yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"yielded": self.yielded}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded.append(state_dict)
        self.yielded = state_dict["yielded"]


def test_a_loader_with_its_own_state_dict_is_delegated_to_not_repositioned(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    loader = fabric.setup_dataloaders(_OwnResumeLoader(_data(10), batch_size=2))
    iterator = iter(loader)
    head = [next(iterator)[0].flatten().tolist() for _ in range(3)]
    fabric.save(tmp_path / "c.ckpt", {"loader": loader, "step": 3})
    assert torch.load(tmp_path / "c.ckpt", weights_only=True)["loader"] == {"yielded": 3}

    again = Fabric(accelerator="cpu", devices=1)
    resumed = again.setup_dataloaders(_OwnResumeLoader(_data(10), batch_size=2))
    again.load(tmp_path / "c.ckpt", {"loader": resumed, "step": 0})
    assert resumed.dataloader.loaded == [{"yielded": 3}]
    rest = [value for (batch,) in resumed for value in batch.flatten().tolist()]
    assert [v for batch in head for v in batch] + rest == [float(i) for i in range(20)]  # each batch once


def test_a_program_that_skips_batches_itself_sees_each_batch_once(tmp_path: Path) -> None:
    """As litgpt's finetune does: the loader is not in the state; the program fast-forwards it."""

    def make(fabric: Fabric) -> Any:
        generator = torch.Generator().manual_seed(0)
        return fabric.setup_dataloaders(
            DataLoader(_data(10), batch_size=2, shuffle=True, generator=generator)
        )

    fabric = Fabric(accelerator="cpu", devices=1)
    model = fabric.setup_module(_model())
    iterator = iter(make(fabric))
    head = [value for _ in range(3) for value in next(iterator)[0].flatten().tolist()]
    fabric.save(tmp_path / "c.ckpt", {"model": model, "iter_num": 3})

    again = Fabric(accelerator="cpu", devices=1)
    state: dict[str, Any] = {"model": again.setup_module(_model()), "iter_num": 0}
    loader = make(again)
    again.load(tmp_path / "c.ckpt", state)
    iterator = iter(loader)
    for _ in range(state["iter_num"]):  # the program's own fast-forward
        next(iterator)
    rest = [value for (batch,) in iterator for value in batch.flatten().tolist()]
    assert sorted(head + rest) == [float(i) for i in range(20)]


def test_random_state_restores_this_process_streams(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    random.seed(1)
    torch.manual_seed(1)
    fabric.save(tmp_path / "c.ckpt", {"rng": RandomState()})
    expected = (random.random(), torch.rand(2))
    random.seed(9)
    torch.manual_seed(9)
    fabric.load(tmp_path / "c.ckpt", {"rng": RandomState()})
    assert random.random() == expected[0] and torch.equal(torch.rand(2), expected[1])
    with pytest.raises(ValueError, match=r"entry 'step' is of type int, not the per-rank entries"):
        fabric.save(tmp_path / "d.ckpt", {"step": 3})
        fabric.load(tmp_path / "d.ckpt", {"step": RandomState()})
