"""The Fabric facade's process facts as Lightning reports them: before launch, and inside a launched job."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from handloom import Fabric
from handloom.strategies import SingleDeviceStrategy

# What torchrun (and `handloom run`) sets for rank 1 of a 2-process job, here on the second node.
TORCHRUN_RANK_1 = {
    "TORCHELASTIC_RUN_ID": "x",
    "WORLD_SIZE": "2",
    "RANK": "1",
    "LOCAL_RANK": "0",
    "GROUP_RANK": "1",
    "LOCAL_WORLD_SIZE": "1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}


@pytest.mark.parametrize(
    ("kwargs", "world_size"),
    [
        ({"devices": 2, "strategy": "ddp_spawn"}, 2),
        ({"devices": 2, "strategy": "ddp_fork"}, 2),
        ({"devices": 2, "strategy": "ddp"}, 2),
        ({"devices": 2, "strategy": "ddp", "num_nodes": 2}, 4),
    ],
)
def test_world_size_before_launch_is_the_planned_size(kwargs: dict[str, Any], world_size: int) -> None:
    fabric = Fabric(accelerator="cpu", **kwargs)
    assert fabric.world_size == world_size == fabric.strategy.world_size
    assert (fabric.global_rank, fabric.local_rank, fabric.node_rank) == (0, 0, 0)
    assert fabric.is_global_zero
    # Unlaunched, nothing tries a collective: the calls ask for launch() instead.
    with pytest.raises(RuntimeError, match=r"Call fabric\.launch\(\)"):
        fabric.all_reduce(torch.tensor(1.0))
    with pytest.raises(RuntimeError, match=r"Call fabric\.launch\(\)"):
        fabric.barrier()
    assert not dist.is_initialized()


def test_backward_of_raw_tensors_with_one_process_is_fine() -> None:
    fabric = Fabric(accelerator="cpu")
    weight = torch.ones(2, requires_grad=True)
    fabric.backward((weight * 3).sum())  # no model set up: one process optimises raw tensors
    assert weight.grad is not None and weight.grad.tolist() == [3.0, 3.0]


@pytest.mark.parametrize("strategy", ["auto", "single_device", SingleDeviceStrategy()])
def test_one_device_fabric_inside_a_launched_job_stands_alone(strategy: Any, tmp_path: Path) -> None:
    with mock.patch.dict(os.environ, TORCHRUN_RANK_1):
        fabric = Fabric(accelerator="cpu", devices=1, strategy=strategy)
        fabric.launch()
    assert isinstance(fabric.strategy, SingleDeviceStrategy)
    assert (fabric.world_size, fabric.global_rank, fabric.local_rank, fabric.node_rank) == (1, 0, 0, 0)
    assert fabric.is_global_zero and fabric.device == torch.device("cpu")
    assert not dist.is_initialized()  # no process group joined
    value = torch.tensor([2.0, 4.0])
    assert fabric.all_reduce(value) is value and value.tolist() == [2.0, 4.0]
    fabric.barrier()
    fabric.save(tmp_path / "merged.pt", {"value": value})
    assert torch.load(tmp_path / "merged.pt", weights_only=True)["value"].tolist() == [2.0, 4.0]


def test_other_process_counts_inside_a_launched_job_are_refused() -> None:
    four = {**TORCHRUN_RANK_1, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    with mock.patch.dict(os.environ, four), pytest.raises(ValueError, match="asks for 2 processes"):
        Fabric(accelerator="cpu", devices=2)
    with mock.patch.dict(os.environ, TORCHRUN_RANK_1), pytest.raises(ValueError, match="asks for 1 process"):
        Fabric(accelerator="cpu", devices=1, strategy="ddp")


def _second_fabric(fabric: Fabric, folder: Path) -> dict[str, Any]:
    rank = fabric.global_rank
    inner = Fabric(accelerator="cpu", devices=1)  # as litgpt's merge_lora does after training
    inner.launch()
    facts = {
        "world_size": inner.world_size,
        "global_rank": inner.global_rank,
        "strategy": type(inner.strategy).__name__,
    }
    # Identity: a collective on the job's group would sum the ranks' values (or wait for the other).
    mine = torch.tensor(float(rank + 1))
    inner.all_reduce(mine, reduce_op="sum")
    assert mine.item() == rank + 1
    inner.save(folder / f"merged-{rank}.pt", {"rank": torch.tensor(rank)})
    # The job's own group is intact and still works.
    assert dist.get_world_size() == 2 and fabric.world_size == 2
    total = torch.tensor(float(rank + 1))
    fabric.all_reduce(total, reduce_op="sum")
    assert total.item() == 3.0
    fabric.barrier()
    return facts


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_second_one_device_fabric_inside_a_two_process_job(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_fork")
    facts = fabric.launch(_second_fabric, tmp_path)
    assert facts == {"world_size": 1, "global_rank": 0, "strategy": "SingleDeviceStrategy"}
    for rank in range(2):
        saved = torch.load(tmp_path / f"merged-{rank}.pt", weights_only=True)
        assert saved["rank"].item() == rank
