"""A run interrupted at any step and resumed from its checkpoint ends bit-identical to one never stopped.

The loop has everything that makes resumes drift: a shuffling DataLoader interrupted mid-epoch,
dropout (torch RNG), a Python-random and a NumPy-random factor in the loss, AdamW state and an LR
scheduler. Its state holds the set-up loader, a ``RandomState`` and the precision runner (the
gradient scaler), which is what an exact resume asks for. Checked on one process, on 2-process
DDP and on 2-process FSDP (sharded checkpoint), and with a gradient scaler (16-mixed) on one process.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from handloom import Fabric
from handloom.checkpoint import RandomState
from handloom.plugins.precision import MixedPrecision
from handloom.strategies import DDPStrategy, FSDPStrategy

EPOCHS = 3


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    return TensorDataset(torch.randn(48, 6, generator=g), torch.randn(48, 1, generator=g))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def _train(
    fabric: Fabric, directory: Path, stop_after: int | None, resume: bool, exact: bool = True
) -> dict[str, Any]:
    """Train; stop (after saving) once ``stop_after`` steps are done; or resume from the checkpoint.

    With ``exact`` the resume restores the loader's position, the random states and the scaler.
    """
    fabric.seed_everything(7)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=0.01))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.7)
    loader = fabric.setup_dataloaders(DataLoader(_data(), batch_size=4, shuffle=True))
    state: dict[str, Any] = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "step": 0,
        "epoch": 0,
        "loader": loader,
        "rng": RandomState(),
        "precision": fabric.strategy.precision,
    }
    if resume:
        loaded = state if exact else {k: v for k, v in state.items() if k not in ("loader", "rng")}
        fabric.load(directory / "ckpt", loaded)
        state.update(step=loaded["step"], epoch=loaded["epoch"])
    losses = []
    for epoch in range(state["epoch"], EPOCHS):
        state["epoch"] = epoch
        for x, y in loader:
            scale = 1.0 + random.random() + float(np.random.rand())
            loss = scale * nn.functional.mse_loss(model(x), y)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            state["step"] += 1
            losses.append(loss.item())
            if state["step"] == stop_after:
                fabric.save(directory / "ckpt", state)
                return {"stopped": True}
        state["epoch"] = epoch + 1
    params = {name: _full(p) for name, p in model.named_parameters()}
    return {"params": params, "steps": state["step"], "losses": losses}


def _run(make: Any, directory: Path, stop_after: int) -> None:
    full = make(functools.partial(_train, directory=directory, stop_after=None, resume=False))
    stopped = make(functools.partial(_train, directory=directory, stop_after=stop_after, resume=False))
    resumed = make(functools.partial(_train, directory=directory, stop_after=None, resume=True))
    assert stopped == {"stopped": True}
    assert resumed["steps"] == full["steps"]
    assert resumed["losses"] == full["losses"][stop_after:]  # same batches, same dropout, same factors
    for name, value in full["params"].items():
        assert torch.equal(resumed["params"][name], value), f"{name} differs after the resume"


@pytest.mark.parametrize("stop_after", [5, 12, 13])  # mid-epoch, at the end of epoch 1, first of epoch 2
def test_one_process_resume_is_bit_identical(tmp_path: Path, stop_after: int) -> None:
    def make(fn: Any) -> Any:
        return fn(Fabric(accelerator="cpu", devices=1))

    _run(make, tmp_path, stop_after)


def test_one_process_resume_with_gradient_scaler(tmp_path: Path) -> None:
    def make(fn: Any) -> Any:
        return fn(Fabric(accelerator="cpu", devices=1, precision=MixedPrecision("16-mixed", "cpu")))

    _run(make, tmp_path, 7)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_resume_is_bit_identical(tmp_path: Path, strategy: str) -> None:
    def make(fn: Any) -> Any:
        chosen = (
            DDPStrategy(start_method="fork")
            if strategy == "ddp"
            else FSDPStrategy(auto_wrap_policy={nn.Linear}, start_method="fork")
        )
        results = Fabric(accelerator="cpu", devices=2, strategy=chosen).launch(fn)
        return results

    _run(make, tmp_path, 4)  # 6 batches per rank and epoch: stop mid-epoch


def test_without_the_loader_and_random_state_the_run_differs(tmp_path: Path) -> None:
    """The control: what the tests above check is what the loader and RandomState in state provide."""
    fabric = Fabric(accelerator="cpu", devices=1)
    full = _train(fabric, tmp_path, None, False)
    _train(Fabric(accelerator="cpu", devices=1), tmp_path, 5, False)
    plain = _train(Fabric(accelerator="cpu", devices=1), tmp_path, None, True, exact=False)
    assert plain["losses"] != full["losses"][5:]
    assert plain["steps"] > full["steps"]  # the interrupted epoch is run whole again


def test_a_loader_in_state_resumes_and_one_set_up_after_the_load_is_left_alone(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = fabric.setup_module(nn.Linear(6, 1))
    loader = fabric.setup_dataloaders(DataLoader(_data(), batch_size=4, shuffle=True))
    iterator = iter(loader)
    seen = [next(iterator)[0] for _ in range(3)]
    fabric.save(tmp_path / "ckpt", {"model": model, "loader": loader})
    rest = [batch[0] for batch in iterator]

    again = Fabric(accelerator="cpu", devices=1)
    resumed_loader = again.setup_dataloaders(DataLoader(_data(), batch_size=4, shuffle=True))
    again.load(tmp_path / "ckpt", {"model": again.setup_module(nn.Linear(6, 1)), "loader": resumed_loader})
    later = again.setup_dataloaders(DataLoader(_data(), batch_size=4, shuffle=True))
    resumed = [batch[0] for batch in resumed_loader]
    assert len(seen) + len(resumed) == 12
    assert all(torch.equal(a, b) for a, b in zip(resumed, rest, strict=True))
    assert len(list(later)) == 12  # not in the state: a whole pass


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_another_world_size_keeps_the_epoch_and_samples_consumed(tmp_path: Path) -> None:
    strategy = DDPStrategy(start_method="fork")
    Fabric(accelerator="cpu", devices=2, strategy=strategy).launch(
        functools.partial(_train, directory=tmp_path, stop_after=8, resume=False)
    )  # 6 batches per rank and epoch: stopped in epoch 1 after 2 of its batches on each rank
    fabric = Fabric(accelerator="cpu", devices=1)
    model = fabric.setup_module(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1)))
    loader = fabric.setup_dataloaders(DataLoader(_data(), batch_size=4, shuffle=True))
    state: dict[str, Any] = {"model": model, "step": 0, "epoch": 0, "loader": loader, "rng": RandomState()}
    with pytest.warns(UserWarning, match="written by 2 processes and this run has 1") as caught:
        fabric.load(tmp_path / "ckpt", state, strict=False)
    assert len([w for w in caught if issubclass(w.category, UserWarning)]) == 1  # not one per value
    saved = torch.load(tmp_path / "ckpt", weights_only=True)["rng"]["ranks"]
    assert torch.equal(torch.get_rng_state(), saved[0]["torch"])  # rank 0 has an entry: restored
    assert state["epoch"] == 1 and state["step"] == 8
    # 2 ranks x 2 batches x 4 samples were consumed in epoch 1: 4 of the 12 batches of one process.
    assert len(list(loader)) == 12 - 4
    assert len(list(loader)) == 12  # the next epoch is whole
