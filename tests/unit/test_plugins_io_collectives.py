"""Checkpoint I/O plugins and one-process collectives (``handloom.plugins.io``, ``.collectives``).

What programs written for Lightning rely on: ``Fabric(plugins=[MyCheckpointIO()])`` saves the
unwrapped checkpoint dict through the plugin, with the path as written (remote storage), and
loads through it; ``TorchCheckpointIO`` writes the same files as ``fabric.save``; sharded
strategies refuse a plugin; plugin lists are checked as Lightning checks them.
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from handloom import Fabric
from handloom.devices import HardwareProbe
from handloom.environments import LocalEnvironment, SLURMEnvironment
from handloom.options import FabricOptions, resolve_plan
from handloom.plugins.collectives import Collective, SingleDeviceCollective, TorchCollective
from handloom.plugins.io import CheckpointIO, TorchCheckpointIO, XLACheckpointIO
from handloom.strategies import DDPStrategy, FSDPStrategy

CPU = HardwareProbe()


class MemoryCheckpointIO(CheckpointIO):
    """Keeps checkpoints in a dict, keyed by the path exactly as the plugin received it."""

    def __init__(self) -> None:
        self.files: dict[Any, dict[str, Any]] = {}
        self.loads: list[Any] = []

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        self.files[path] = pickle.loads(pickle.dumps(checkpoint))  # a copy, as a file would hold

    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        self.loads.append(path)
        return pickle.loads(pickle.dumps(self.files[path]))

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        del self.files[path]


# --- TorchCheckpointIO: handloom's crash-safe files --------------------------------------------------


def test_torch_checkpoint_io_writes_reads_and_removes_files(tmp_path: Path) -> None:
    io = TorchCheckpointIO()
    target = tmp_path / "deep" / "step-1.ckpt"
    io.save_checkpoint({"weights": torch.arange(3.0), "step": 1}, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["step-1.ckpt"]  # no temporary left
    loaded = io.load_checkpoint(str(target))
    assert torch.equal(loaded["weights"], torch.arange(3.0)) and loaded["step"] == 1
    assert io.load_checkpoint(target, map_location="meta")["weights"].is_meta

    # A save that fails leaves the previous file as it was (the write is atomic).
    with pytest.raises(TypeError, match=r"state\['fn'\] holds"):
        io.save_checkpoint({"fn": lambda: None}, target)
    assert io.load_checkpoint(target)["step"] == 1

    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({"step": 2}, target, storage_options={"bucket": "b"})
    io.remove_checkpoint(target)
    assert not target.exists()
    io.remove_checkpoint(target)  # nothing there: nothing to do
    with pytest.raises(FileNotFoundError, match="No checkpoint file"):
        io.load_checkpoint(target)


def test_torch_checkpoint_io_loads_safely_unless_told(tmp_path: Path) -> None:
    target = tmp_path / "objects.ckpt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, target)  # an object a safe load refuses
    with pytest.raises(pickle.UnpicklingError, match="weights_only=False"):
        TorchCheckpointIO().load_checkpoint(target)  # weights_only=None means True, as in torch
    assert TorchCheckpointIO().load_checkpoint(target, weights_only=False)["args"].lr == 0.1


def test_xla_checkpoint_io_is_refused_with_the_alternative() -> None:
    with pytest.raises(NotImplementedError, match=r"XLACheckpointIO\(\).*TorchCheckpointIO"):
        XLACheckpointIO()


# --- Fabric(plugins=[CheckpointIO]) ----------------------------------------------------------------


def test_fabric_saves_and_loads_through_the_plugin_with_the_path_as_written() -> None:
    io = MemoryCheckpointIO()
    fabric = Fabric(accelerator="cpu", plugins=[io])
    assert fabric.strategy.checkpoint_io is io
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = fabric.setup(model, optimizer)
    fabric.backward(model(torch.ones(1, 2)).sum())
    optimizer.step()
    saved_weight = model.weight.detach().clone()

    fabric.save("s3://bucket/run/step-1.ckpt", {"model": model, "optimizer": optimizer, "step": 1})
    # What Lightning hands the plugin: the unwrapped state dicts, under the path exactly as given.
    assert list(io.files) == ["s3://bucket/run/step-1.ckpt"]
    written = io.files["s3://bucket/run/step-1.ckpt"]
    assert set(written) == {"model", "optimizer", "step"} and written["step"] == 1
    assert set(written["model"]) == {"weight", "bias"}  # no wrapper prefix
    assert torch.equal(written["model"]["weight"], saved_weight)
    assert written["optimizer"]["param_groups"][0]["lr"] == 0.1

    with torch.no_grad():
        model.weight.zero_()
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load("s3://bucket/run/step-1.ckpt", state)
    assert state["step"] == 1 and torch.equal(model.weight, saved_weight)
    assert fabric.load("s3://bucket/run/step-1.ckpt")["step"] == 1

    io.save_checkpoint({"weight": torch.ones(2, 2), "bias": torch.zeros(2)}, "s3://bucket/raw.pt")
    fabric.load_raw("s3://bucket/raw.pt", model)
    assert torch.equal(model.weight, torch.ones(2, 2))
    assert io.loads == ["s3://bucket/run/step-1.ckpt"] * 2 + ["s3://bucket/raw.pt"]


def test_without_a_plugin_the_strategy_uses_torch_checkpoint_io(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu")
    assert type(fabric.strategy.checkpoint_io) is TorchCheckpointIO
    model = fabric.setup(torch.nn.Linear(2, 1))
    fabric.save(tmp_path / "a.ckpt", {"model": model, "step": 4})
    assert TorchCheckpointIO().load_checkpoint(tmp_path / "a.ckpt")["step"] == 4


def _plan(**kwargs: Any) -> Any:
    return resolve_plan(FabricOptions(**kwargs), {}, CPU)


@pytest.mark.parametrize(
    ("plugins", "error", "words"),
    [
        ([MemoryCheckpointIO(), TorchCheckpointIO()], ValueError,
         r"2 CheckpointIO plugins \(MemoryCheckpointIO\(\), TorchCheckpointIO\(\)\)"),
        ([LocalEnvironment(), SLURMEnvironment()], ValueError,
         r"2 cluster environments \(LocalEnvironment\(\), SLURMEnvironment\(\)\)"),
        ([TorchCheckpointIO(), "bf16-mixed"], TypeError, r"plugins=\[str\(...\)\]\) is not a plugin"),
        ([DDPStrategy()], TypeError, r"plugins=\[DDPStrategy\(...\)\]\) is not a plugin"),
    ],
)  # fmt: skip
def test_plugins_are_checked_as_lightning_checks_them(
    plugins: Any, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        _plan(accelerator="cpu", plugins=plugins)


def test_one_plugin_of_each_kind_is_accepted() -> None:
    io, environment = MemoryCheckpointIO(), LocalEnvironment()
    plan = _plan(accelerator="cpu", plugins=[environment, io])
    assert plan.environment is environment and plan.strategy.checkpoint_io is io
    assert Fabric(accelerator="cpu", plugins=io).strategy.checkpoint_io is io  # one plugin, not in a list


def test_a_checkpoint_io_given_twice_is_refused() -> None:
    strategy = DDPStrategy(start_method="fork")
    strategy.checkpoint_io = TorchCheckpointIO()
    with pytest.raises(ValueError, match=r"conflicts with DDPStrategy\(checkpoint_io=TorchCheckpointIO"):
        _plan(accelerator="cpu", devices=2, strategy=strategy, plugins=[MemoryCheckpointIO()])


def test_sharded_strategies_refuse_a_checkpoint_io() -> None:
    with pytest.raises(NotImplementedError, match=r"strategy='fsdp', plugins=\[MemoryCheckpointIO\(\)\]"):
        _plan(accelerator="cpu", devices=2, strategy="fsdp", plugins=[MemoryCheckpointIO()])
    with pytest.raises(NotImplementedError, match=r"FSDPStrategy.checkpoint_io does not exist"):
        _ = FSDPStrategy().checkpoint_io


# --- collectives in one process ----------------------------------------------------------------------


def test_single_device_collective_returns_its_inputs() -> None:
    collective = SingleDeviceCollective()
    assert isinstance(collective, Collective) and (collective.rank, collective.world_size) == (0, 1)
    tensor, other = torch.tensor([1.0, 2.0]), torch.tensor([3.0])
    assert collective.all_reduce(tensor, "sum") is tensor and collective.broadcast(tensor, 0) is tensor
    assert collective.reduce(tensor, 0, "sum") is tensor and collective.recv(tensor) is tensor
    assert collective.all_gather([], tensor) == [tensor] and collective.gather(tensor, []) == [tensor]
    assert collective.scatter(tensor, [other]) is other
    assert collective.reduce_scatter(tensor, [other, tensor], "sum") is other
    assert collective.all_to_all([], [tensor, other]) == [tensor, other]
    collective.send(tensor, 0)
    collective.barrier()
    assert collective.setup() is collective and collective.is_initialized() and collective.is_available()
    with pytest.raises(RuntimeError, match="owns no group"):
        collective.teardown()
    with pytest.raises(RuntimeError, match=r"create_group\(\) first"):
        _ = collective.group
    collective.create_group()
    with pytest.raises(RuntimeError, match="already owns a group"):
        collective.create_group()
    assert collective.teardown() is collective


def test_torch_collective_names_reductions_as_torch_does() -> None:
    assert TorchCollective._convert_to_native_op("sum") == dist.ReduceOp.SUM
    assert TorchCollective._convert_to_native_op("Max") == dist.ReduceOp.MAX
    assert TorchCollective._convert_to_native_op(dist.ReduceOp.PRODUCT) == dist.ReduceOp.PRODUCT
    with pytest.raises(ValueError, match=r"op='mean' is not a torch.distributed.ReduceOp.*'bxor'"):
        TorchCollective._convert_to_native_op("mean")
    with pytest.raises(ValueError, match=r"op=3 is a int"):
        TorchCollective._convert_to_native_op(3)  # type: ignore[arg-type]
    assert TorchCollective.is_available() and not TorchCollective.is_initialized()
