"""Checkpoints of sharded models: a directory that reshards, or one full file for torch.load.

Saved by 2 FSDP processes, loaded by 1 FSDP process (another world size), by a plain model under
a single-device Fabric, and by plain PyTorch without Fabric.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from handloom import Fabric
from handloom.strategies import FSDPStrategy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        "params": {n: _full(p) for n, p in model.named_parameters()},
        "exp_avg": {names[id(p)]: _full(s["exp_avg"]) for p, s in optimizer.state.items()},
        "step": {names[id(p)]: float(_full(s["step"])) for p, s in optimizer.state.items()},
    }


def _train_and_save(fabric: Fabric, directory: Path) -> dict[str, Any]:
    model = _model()
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=0.1))
    for step in range(2):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(10 * step + fabric.global_rank))
        fabric.backward(model(x).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
    state = {"model": model, "optimizer": optimizer, "step": 2, "note": "kept"}
    fabric.save(directory / "sharded", state)
    fabric.strategy.state_dict_type = "full"  # type: ignore[attr-defined]
    fabric.save(directory / "full.ckpt", state)
    return _snapshot(model.module, optimizer)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    directory = tmp_path_factory.mktemp("ckpt")
    strategy = FSDPStrategy(auto_wrap_policy={nn.Linear}, start_method="fork")
    expected = Fabric(accelerator="cpu", devices=2, strategy=strategy).launch(
        functools.partial(_train_and_save, directory=directory)
    )
    return directory, expected


def _assert_same(snapshot: dict[str, Any], expected: dict[str, Any]) -> None:
    for key in ("params", "exp_avg"):
        assert snapshot[key].keys() == expected[key].keys()
        for name, value in expected[key].items():
            torch.testing.assert_close(snapshot[key][name], value, rtol=0, atol=0, msg=f"{key} {name}")
    assert snapshot["step"] == expected["step"]


def test_sharded_directory_layout(saved: tuple[Path, dict[str, Any]]) -> None:
    directory, _ = saved
    files = sorted(p.name for p in (directory / "sharded").iterdir())
    assert ".metadata" in files and "meta.pt" in files
    assert sum(name.endswith(".distcp") for name in files) == 2  # one shard file per rank


@pytest.mark.parametrize("name", ["sharded", "full.ckpt"])
def test_loads_into_a_plain_model_under_one_device(saved: tuple[Path, dict[str, Any]], name: str) -> None:
    directory, expected = saved
    fabric = Fabric(accelerator="cpu", devices=1)
    model = _model()
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=0.1))
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}
    remainder = fabric.load(directory / name, state)
    _assert_same(_snapshot(model.module, optimizer), expected)
    assert state["step"] == 2 and remainder == {"note": "kept"}


def test_full_file_is_plain_torch(saved: tuple[Path, dict[str, Any]]) -> None:
    directory, expected = saved
    data = torch.load(directory / "full.ckpt", weights_only=True)
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.load_state_dict(data["model"])
    optimizer.load_state_dict(data["optimizer"])
    _assert_same(_snapshot(model, optimizer), expected)


def test_reading_a_sharded_checkpoint_without_state_returns_full_tensors(
    saved: tuple[Path, dict[str, Any]],
) -> None:
    directory, expected = saved
    everything = Fabric(accelerator="cpu", devices=1).load(directory / "sharded")
    assert everything["step"] == 2 and everything["note"] == "kept"
    torch.testing.assert_close(everything["model"]["0.weight"], expected["params"]["0.weight"])


@pytest.fixture
def one_process_fsdp() -> Iterator[Fabric]:
    fabric = Fabric(accelerator="cpu", devices=1, strategy=FSDPStrategy(auto_wrap_policy={nn.Linear}))
    fabric.launch()
    yield fabric
    fabric.strategy.teardown()


@pytest.mark.parametrize("name", ["sharded", "full.ckpt"])
def test_loads_into_fsdp_on_another_world_size(
    saved: tuple[Path, dict[str, Any]], name: str, one_process_fsdp: Fabric
) -> None:
    directory, expected = saved
    fabric = one_process_fsdp
    model = _model()
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=0.1))
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load(directory / name, state)
    assert isinstance(next(model.parameters()), DTensor)
    _assert_same(_snapshot(model.module, optimizer), expected)
    assert state["step"] == 2


def test_incomplete_sharded_directory_is_a_clear_error(
    saved: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    directory, _ = saved
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / ".metadata").write_bytes((directory / "sharded" / ".metadata").read_bytes())
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3))
    with pytest.raises(FileNotFoundError, match=r"broken.*without handloom\.json"):
        Fabric(accelerator="cpu", devices=1).load(broken, {"model": model})


def test_missing_key_is_named(saved: tuple[Path, dict[str, Any]]) -> None:
    directory, _ = saved
    with pytest.raises(KeyError, match="'scheduler'"):
        Fabric(accelerator="cpu", devices=1).load(directory / "sharded", {"scheduler": object()})


def test_load_raw_puts_a_plain_state_dict_into_a_sharded_model(
    saved: tuple[Path, dict[str, Any]], one_process_fsdp: Fabric, tmp_path: Path
) -> None:
    _, expected = saved
    torch.save(expected["params"], tmp_path / "weights.pt")  # torch.save(model.state_dict()) of a plain model
    model = one_process_fsdp.setup_module(_model())
    one_process_fsdp.load_raw(tmp_path / "weights.pt", model)
    for name, param in model.module.named_parameters():
        assert isinstance(param, DTensor)
        torch.testing.assert_close(_full(param), expected["params"][name], rtol=0, atol=0)

    # A key the file lacks is an error under strict=True (torch alone would keep the old value silently).
    partial = {name: value for name, value in expected["params"].items() if name != "0.bias"}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: '0\.bias'"):
        one_process_fsdp.load_raw(tmp_path / "partial.pt", model)
    one_process_fsdp.load_raw(tmp_path / "partial.pt", model, strict=False)


def test_a_filter_applies_to_the_model_in_sharded_and_full_saves(
    one_process_fsdp: Fabric, tmp_path: Path
) -> None:
    fabric = one_process_fsdp
    model = fabric.setup_module(_model())
    only_first_layer = {"model": lambda name, value: name.startswith("0.")}
    fabric.save(tmp_path / "sharded", {"model": model, "step": 1}, filter=only_first_layer)
    fabric.strategy.state_dict_type = "full"  # type: ignore[attr-defined]
    fabric.save(tmp_path / "full.ckpt", {"model": model, "step": 1}, filter=only_first_layer)
    sharded = Fabric(accelerator="cpu", devices=1).load(tmp_path / "sharded")
    full = torch.load(tmp_path / "full.ckpt", weights_only=True)
    for data in (sharded, full):
        assert sorted(data["model"]) == ["0.bias", "0.weight"] and data["step"] == 1
