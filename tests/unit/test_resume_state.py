"""Resume values a state may hold: random states, set-up loaders' positions, the gradient scaler."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from handloom import Fabric
from handloom.checkpoint import RESUME_KEY, RandomState, resume
from handloom.plugins.precision import MixedPrecision


def test_random_states_round_trip() -> None:
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    saved = resume.capture_rng()
    expected = (torch.rand(3), random.random(), np.random.rand(2))
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    resume.restore_rng(saved)
    got = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and np.array_equal(got[2], expected[2])


def test_loader_and_random_states_are_saved_under_their_keys_and_read_with_weights_only(
    tmp_path: Path,
) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    loader = fabric.setup_dataloaders(DataLoader(TensorDataset(torch.arange(8.0)), batch_size=2))
    iterator = iter(loader)
    next(iterator)
    state = {"model": fabric.setup_module(nn.Linear(2, 2)), "step": 3, "loader": loader, "rng": RandomState()}
    fabric.save(tmp_path / "c.ckpt", state)
    data = torch.load(tmp_path / "c.ckpt", weights_only=True)  # plain torch, safe mode
    assert list(data) == ["model", "step", "loader", "rng"]  # exactly the keys of state, in order
    assert data["loader"]["world_size"] == 1 and data["loader"]["ranks"][0]["position"] == 1
    assert data["rng"]["world_size"] == 1 and set(data["rng"]["ranks"]) == {0}
    assert torch.equal(data["rng"]["ranks"][0]["torch"], torch.get_rng_state())


def test_resume_state_is_deprecated_and_false_skips_loaders_and_random_states(tmp_path: Path) -> None:
    data = TensorDataset(torch.arange(8.0))
    fabric = Fabric(accelerator="cpu", devices=1)
    loader = fabric.setup_dataloaders(DataLoader(data, batch_size=2))
    iterator = iter(loader)
    next(iterator)
    with pytest.warns(DeprecationWarning, match=r"resume_state=True\) is deprecated.*no effect on a save"):
        fabric.save(
            tmp_path / "c.ckpt", {"step": 3, "loader": loader, "rng": RandomState()}, resume_state=True
        )
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    again = Fabric(accelerator="cpu", devices=1)
    fresh = again.setup_dataloaders(DataLoader(data, batch_size=2))
    state: dict[str, Any] = {"step": 0, "loader": fresh, "rng": RandomState()}
    with pytest.warns(DeprecationWarning, match="resume_state=False skips restoring"):
        again.load(tmp_path / "c.ckpt", state, resume_state=False)
    assert torch.equal(torch.rand(2), expected)  # the random states of the save were not applied
    assert state["step"] == 3 and state["loader"] is fresh
    assert len(_pass(fresh)) == 4  # not repositioned


def test_the_key_handloom_is_the_users(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.save(tmp_path / "c.ckpt", {RESUME_KEY: {"note": 1}, "step": 2})
    assert torch.load(tmp_path / "c.ckpt", weights_only=True) == {RESUME_KEY: {"note": 1}, "step": 2}
    state: dict[str, Any] = {RESUME_KEY: None}
    assert fabric.load(tmp_path / "c.ckpt", state) == {"step": 2}
    assert state[RESUME_KEY] == {"note": 1}
    with pytest.raises(TypeError, match="needs a dict for state, got list"):
        Fabric(accelerator="cpu", devices=1).save(tmp_path / "d.ckpt", [1])  # type: ignore[arg-type]
    assert not (tmp_path / "d.ckpt").exists()


def test_load_returns_the_remainder(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.save(tmp_path / "c.ckpt", {"step": 3, "extra": "x"})
    state: dict[str, Any] = {"step": 0}
    assert fabric.load(tmp_path / "c.ckpt", state) == {"extra": "x"}
    assert state["step"] == 3
    assert fabric.load(tmp_path / "c.ckpt") == {"step": 3, "extra": "x"}  # state=None: everything


def test_gradient_scaler_state_is_restored_when_asked(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1, precision=MixedPrecision("16-mixed", "cpu"))
    scaler = fabric.strategy.amp.scaler
    assert scaler is not None
    scaler.scale(torch.ones(()))  # the scale starts lazily, at the first scaled loss
    scaler.update(1024.0)
    fabric.save(tmp_path / "c.ckpt", {"step": 1, "precision": fabric.strategy.precision})
    assert torch.load(tmp_path / "c.ckpt", weights_only=True)["precision"]["scale"] == 1024.0
    again = Fabric(accelerator="cpu", devices=1, precision=MixedPrecision("16-mixed", "cpu"))
    again.load(tmp_path / "c.ckpt", {"step": 0})  # not asked for: the scaler is left alone
    assert again.strategy.amp.scaler is not None and again.strategy.amp.scaler.get_scale() != 1024.0
    again.load(tmp_path / "c.ckpt", {"step": 0, "precision": again.strategy.precision})
    assert again.strategy.amp.scaler.get_scale() == 1024.0
    plain = Fabric(accelerator="cpu", devices=1)
    assert plain.strategy.precision.state_dict() == {}  # no scaler: an empty state
    plain.load(tmp_path / "c.ckpt", {"precision": plain.strategy.precision}, strict=False)


def _pass(loader: Any) -> list[torch.Tensor]:
    return [batch[0] if isinstance(batch, (list, tuple)) else batch for batch in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_pass_resumes_mid_way_in_the_same_order(tmp_path: Path, num_workers: int) -> None:
    data = TensorDataset(torch.arange(40.0).unsqueeze(1))

    def make(fabric: Fabric) -> Any:
        return fabric.setup_dataloaders(DataLoader(data, batch_size=4, shuffle=True, num_workers=num_workers))

    torch.manual_seed(0)
    fabric = Fabric(accelerator="cpu", devices=1)
    loader = make(fabric)
    first_epoch = _pass(loader)
    iterator = iter(loader)
    head = [next(iterator)[0] for _ in range(4)]
    fabric.save(tmp_path / "c.ckpt", {"loader": loader, "rng": RandomState()})
    tail = _pass(iterator)
    next_epoch = _pass(loader)

    torch.manual_seed(123)  # a different live state must not matter
    again = Fabric(accelerator="cpu", devices=1)
    resumed_loader = make(again)
    again.load(tmp_path / "c.ckpt", {"loader": resumed_loader, "rng": RandomState()})
    resumed = _pass(resumed_loader)
    assert len(head) + len(resumed) == 10
    assert all(torch.equal(a, b) for a, b in zip(resumed, tail, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(_pass(resumed_loader), next_epoch, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first_epoch, next_epoch, strict=True))


class _Stream(IterableDataset[torch.Tensor]):
    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(torch.arange(10.0).split(1))


def test_iterable_datasets_are_replayed_to_the_position(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    loader = fabric.setup_dataloaders(DataLoader(_Stream(), batch_size=2))
    iterator = iter(loader)
    next(iterator), next(iterator)
    fabric.save(tmp_path / "c.ckpt", {"loader": loader})
    again = Fabric(accelerator="cpu", devices=1)
    resumed_loader = again.setup_dataloaders(DataLoader(_Stream(), batch_size=2))
    again.load(tmp_path / "c.ckpt", {"loader": resumed_loader})
    assert [b.flatten().tolist() for b in resumed_loader] == [[4.0, 5.0], [6.0, 7.0], [8.0, 9.0]]


def test_a_loop_left_with_break_starts_a_fresh_pass(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    data = TensorDataset(torch.arange(8.0).unsqueeze(1))
    loader = fabric.setup_dataloaders(DataLoader(data, batch_size=2))
    for _ in loader:
        break  # an evaluation capped at one batch: the pass is abandoned, not in progress
    fabric.save(tmp_path / "c.ckpt", {"loader": loader})
    again = Fabric(accelerator="cpu", devices=1)
    resumed_loader = again.setup_dataloaders(DataLoader(data, batch_size=2))
    again.load(tmp_path / "c.ckpt", {"loader": resumed_loader})
    assert len(_pass(resumed_loader)) == 4
