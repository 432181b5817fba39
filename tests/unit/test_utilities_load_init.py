"""``handloom.utilities.load`` and ``.init``: Lightning's private helpers that litgpt imports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from handloom.utilities.init import (
    _EmptyInit,
    _has_meta_device_parameters_or_buffers,
    _materialize_meta_tensors,
)
from handloom.utilities.load import _lazy_load, _materialize_tensors, _move_state_into, _NotYetLoadedTensor


class _Counter:
    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = state["count"]


def test_lazy_load_feeds_load_state_dict_and_keeps_other_values(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = nn.Linear(4, 3)
    path = tmp_path / "model.pth"
    torch.save({"model": source.state_dict(), "step": 7, "note": {"lr": 0.1}}, path)

    loaded = _lazy_load(path)
    target = nn.Linear(4, 3)
    target.load_state_dict(loaded["model"])

    assert torch.equal(target.weight, source.weight)
    assert torch.equal(target.bias, source.bias)
    assert loaded["step"] == 7
    assert loaded["note"] == {"lr": 0.1}
    assert not any(isinstance(v, _NotYetLoadedTensor) for v in loaded["model"].values())


def test_lazy_load_values_outlive_a_replaced_file(tmp_path: Path) -> None:
    # The tensors are memory-mapped: writing a new checkpoint over the path (as saves do, by
    # renaming a finished file onto it) must not change what was already loaded.
    path = tmp_path / "model.pth"
    torch.save({"w": torch.arange(6.0)}, path)
    loaded = _lazy_load(path)
    torch.save({"w": torch.zeros(6)}, tmp_path / "next.pth")
    os.replace(tmp_path / "next.pth", path)

    assert torch.equal(loaded["w"], torch.arange(6.0))
    assert _materialize_tensors(loaded) is loaded  # ordinary tensors already: nothing left to read


def test_lazy_load_of_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        _lazy_load(tmp_path / "missing.pth")


def test_not_yet_loaded_tensor_cannot_be_made() -> None:
    with pytest.raises(TypeError, match="memory-mapped"):
        _NotYetLoadedTensor()


def test_move_state_into_loads_stateful_objects_and_replaces_values() -> None:
    counter = _Counter()
    source = {"counter": {"count": 5}, "step": 3, "extra": "kept"}
    destination = {"counter": counter, "step": 0}

    _move_state_into(source, destination, keys={"counter", "step", "absent"})

    assert destination["counter"] is counter  # loaded in place, not replaced
    assert counter.count == 5
    assert destination["step"] == 3
    assert source == {"extra": "kept"}  # moved keys leave the source; others stay

    _move_state_into(source, destination)
    assert destination["extra"] == "kept"
    assert source == {}


def test_empty_init_skips_weight_initialisation_only_when_enabled() -> None:
    torch.manual_seed(0)
    expected = nn.Linear(8, 8)

    torch.manual_seed(0)
    before = torch.get_rng_state()
    with _EmptyInit():
        nn.Linear(8, 8)
    assert torch.equal(torch.get_rng_state(), before)  # no torch.nn.init function drew numbers

    torch.manual_seed(0)
    with _EmptyInit(enabled=False):
        built = nn.Linear(8, 8)
    assert torch.equal(built.weight, expected.weight)


def test_has_meta_device_parameters_or_buffers() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.device("meta"):
        model.append(nn.Linear(2, 2))
    optimizer = torch.optim.SGD(model[1].parameters(), lr=0.1)

    assert _has_meta_device_parameters_or_buffers(model)
    assert not _has_meta_device_parameters_or_buffers(model, recurse=False)  # the container owns none
    assert not _has_meta_device_parameters_or_buffers(model[0])
    assert _has_meta_device_parameters_or_buffers(optimizer)
    assert not _has_meta_device_parameters_or_buffers(torch.optim.SGD(model[0].parameters(), lr=0.1))
    with pytest.raises(TypeError, match="module or an optimizer"):
        _has_meta_device_parameters_or_buffers(torch.zeros(2))  # type: ignore[arg-type]


def test_materialize_meta_tensors_initialises_meta_modules_and_keeps_loaded_ones() -> None:
    loaded = nn.Linear(3, 3)
    with torch.device("meta"):
        fresh = nn.Linear(3, 3)
    model = nn.Sequential(loaded, fresh)
    kept = loaded.weight.detach().clone()

    torch.manual_seed(1)
    _materialize_meta_tensors(model, torch.device("cpu"))
    torch.manual_seed(1)
    reference = nn.Linear(3, 3)

    assert not _has_meta_device_parameters_or_buffers(model)
    assert torch.equal(model[0].weight, kept)
    assert model[0] is loaded and model[0].weight is loaded.weight
    assert torch.equal(model[1].weight, reference.weight)  # reset_parameters() ran on real memory
    assert torch.equal(model[1].bias, reference.bias)


def test_materialize_meta_tensors_needs_reset_parameters() -> None:
    class NoReset(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.empty(2, device="meta"))

    with pytest.raises(TypeError, match=r"NoReset\.reset_parameters"):
        _materialize_meta_tensors(NoReset(), "cpu")
