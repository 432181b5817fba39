"""Lightning's plugins on real gloo process groups (2 processes per test).

What programs written for Lightning rely on: a ``ClusterEnvironment`` of their own, for processes
a scheduler starts, places each process and joins them; the environment is told its ranks; a
``CheckpointIO`` plugin receives the checkpoint once, from global rank 0, and every rank loads
through it; ``TorchCollective`` runs each ``torch.distributed`` collective on Fabric's group, on a
group of its own, and on a default group it creates and destroys itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from handloom import Fabric
from handloom.launcher import find_free_port
from handloom.plugins.collectives import TorchCollective
from handloom.plugins.environments import LightningEnvironment
from handloom.plugins.io import TorchCheckpointIO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


class _RecordingCheckpointIO(TorchCheckpointIO):
    """handloom's files, plus one marker file per call naming the rank that made it."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def _mark(self, what: str) -> None:
        rank = os.environ.get("RANK", "?")
        (self.log / f"{what}-rank{rank}-{len(list(self.log.glob(f'{what}-rank{rank}-*')))}").touch()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self._mark("save")
        super().save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        self._mark("load")
        return super().load_checkpoint(path, map_location, weights_only)


def _environment_checks(fabric: Fabric, environment: LightningEnvironment) -> None:
    # Each process Fabric started told the environment its rank, as Lightning's strategies do.
    told = fabric.all_gather(torch.tensor([environment.global_rank(), environment.world_size()]))
    assert told.tolist() == [[0, 2], [1, 2]]


def _checkpoint_checks(fabric: Fabric, folder: Path) -> None:
    rank = fabric.global_rank
    model = fabric.setup(torch.nn.Linear(2, 2))
    fabric.save(folder / "step.ckpt", {"model": model, "step": 7})
    # Every rank returns once the file is written; rank 0 alone handed it to the plugin.
    assert sorted(p.name for p in (folder / "log").glob("save-*")) == ["save-rank0-0"]
    with torch.no_grad():
        model.weight.fill_(float(rank + 5))
    state: dict[str, Any] = {"model": model, "step": 0}
    fabric.load(folder / "step.ckpt", state)
    assert state["step"] == 7 and _same_on_all_ranks(fabric, model.weight.detach())
    fabric.barrier()
    assert sorted(p.name for p in (folder / "log").glob("load-*")) == ["load-rank0-0", "load-rank1-0"]


def _same_on_all_ranks(fabric: Fabric, tensor: torch.Tensor) -> bool:
    gathered = fabric.all_gather(tensor)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def _collective_ops(collective: TorchCollective) -> None:
    """Every operation, on the collective's group of two ranks."""
    rank = collective.rank
    assert collective.world_size == 2 and rank in (0, 1)
    value = torch.tensor([1.0, 10.0]) * (rank + 1)
    assert collective.all_reduce(value, op="sum") is value and value.tolist() == [3.0, 30.0]
    value = torch.tensor([float(rank)])
    collective.all_reduce(value, op=dist.ReduceOp.MAX)
    assert value.item() == 1.0
    value = torch.tensor([rank + 2.0])
    collective.reduce(value, dst=1, op="product")
    assert rank == 0 or value.item() == 6.0
    value = torch.tensor([rank + 0.5])
    assert collective.broadcast(value, src=1).item() == 1.5
    parts = collective.all_gather([torch.zeros(1), torch.zeros(1)], torch.tensor([rank + 1.0]))
    assert [p.item() for p in parts] == [1.0, 2.0]
    gathered = collective.gather(
        torch.tensor([rank * 3.0]), [torch.zeros(1), torch.zeros(1)] if rank == 0 else []
    )
    assert rank == 1 or [g.item() for g in gathered] == [0.0, 3.0]
    pieces = [torch.tensor([5.0]), torch.tensor([6.0])] if rank == 0 else []
    assert collective.scatter(torch.zeros(1), pieces, src=0).item() == 5.0 + rank
    out = collective.reduce_scatter(
        torch.zeros(1), [torch.tensor([1.0 + rank]), torch.tensor([10.0 + rank])], op="sum"
    )
    assert out.item() == (3.0 if rank == 0 else 21.0)
    received = collective.all_to_all(
        [torch.zeros(1), torch.zeros(1)], [torch.tensor([rank * 10.0 + i]) for i in (0, 1)]
    )
    assert [r.item() for r in received] == [rank, 10.0 + rank]
    if rank == 0:
        collective.send(torch.tensor([42.0]), dst=1, tag=3)
    else:
        assert collective.recv(torch.zeros(1), src=0, tag=3).item() == 42.0
    collective.barrier()
    collective.monitored_barrier(wait_all_ranks=True)
    assert collective.all_gather_object([None, None], {"rank": rank}) == [{"rank": 0}, {"rank": 1}]
    assert collective.broadcast_object_list(["mine" if rank == 0 else None], src=0) == ["mine"]
    objects = collective.gather_object(rank * 2, [None, None] if rank == 0 else None, dst=0)  # type: ignore[arg-type]
    assert rank == 1 or objects == [0, 2]
    output: list[Any] = [None]
    collective.scatter_object_list(output, ["a", "b"] if rank == 0 else [None, None], src=0)
    assert output == ["a" if rank == 0 else "b"]


def _collective_checks(fabric: Fabric) -> None:
    # On Fabric's default group: the collective owns no group until create_group().
    on_default = TorchCollective()
    assert on_default.setup() is on_default and on_default.group is dist.GroupMember.WORLD
    assert not TorchCollective.manages_default_group  # Fabric created the default group
    _collective_ops(on_default)

    # A group of its own; teardown destroys it and leaves Fabric's group alone.
    own = TorchCollective().create_group(ranks=[0, 1], backend="gloo")
    assert own.group is not dist.GroupMember.WORLD
    _collective_ops(own)
    own.teardown()
    with pytest.raises(RuntimeError, match="owns no group"):
        own.teardown()
    assert dist.is_initialized() and fabric.all_reduce(torch.tensor(1.0), reduce_op="sum").item() == 2.0

    # A default group the collective creates, at an address it is given, and destroys at teardown.
    port = fabric.broadcast(find_free_port())
    dist.destroy_process_group()  # Fabric's; the worker ends right after
    for name in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"):
        os.environ.pop(name, None)
    rank = int(os.environ["RANK"])
    created = TorchCollective().setup(
        main_address="127.0.0.1", main_port=port, backend="gloo", rank=rank, world_size=2
    )
    assert TorchCollective.manages_default_group and "MASTER_ADDR" not in os.environ
    created.create_group()
    _collective_ops(created)
    created.teardown()
    assert not dist.is_initialized() and not TorchCollective.manages_default_group


def _plugins_job(fabric: Fabric, environment: LightningEnvironment, folder: Path) -> None:
    _environment_checks(fabric, environment)
    _checkpoint_checks(fabric, folder)
    _collective_checks(fabric)


def test_plugins_in_a_job_fabric_starts(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    environment = LightningEnvironment()
    fabric = Fabric(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        plugins=[environment, _RecordingCheckpointIO(tmp_path / "log")],
    )
    fabric.launch(_plugins_job, environment, tmp_path)


# A scheduler of our own: it starts every process with JOB_* variables; the environment is written
# against Lightning's abstract methods only.
_SCRIPT = textwrap.dedent(
    """
    import json, os
    import torch
    from handloom import Fabric
    from handloom.plugins.environments import ClusterEnvironment

    class JobEnvironment(ClusterEnvironment):
        def __init__(self):
            self.told = []

        @property
        def creates_processes_externally(self):
            return True

        @property
        def main_address(self):
            return os.environ["JOB_HEAD"]

        @property
        def main_port(self):
            return int(os.environ["JOB_PORT"])

        @staticmethod
        def detect():
            return "JOB_RANK" in os.environ

        def world_size(self):
            return int(os.environ["JOB_SIZE"])

        def set_world_size(self, size):
            self.told.append(["world_size", size])

        def global_rank(self):
            return int(os.environ["JOB_RANK"])

        def set_global_rank(self, rank):
            self.told.append(["global_rank", rank])

        def local_rank(self):
            return int(os.environ["JOB_RANK"])

        def node_rank(self):
            return 0

    environment = JobEnvironment()
    fabric = Fabric(accelerator="cpu", strategy="ddp", devices=2, plugins=[environment])
    fabric.launch()
    rank = fabric.global_rank
    total = fabric.all_reduce(torch.tensor(float(rank + 1)), reduce_op="sum").item()
    torch.manual_seed(0)
    model = fabric.setup(torch.nn.Linear(3, 1))
    fabric.backward(model(torch.full((2, 3), float(rank))).sum())
    grads = fabric.all_gather(model.weight.grad)
    same = bool(torch.equal(grads[0], grads[1]))
    print(json.dumps({"rank": rank, "world_size": fabric.world_size, "total": total, "told": environment.told,
                      "grad": model.weight.grad.tolist(), "same_grad": same}))
    """
)


def test_an_environment_written_for_lightning_joins_processes_a_scheduler_started(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "MASTER_", "SLURM_"))}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"):
        base.pop(name, None)
    job = {"JOB_HEAD": "127.0.0.1", "JOB_PORT": str(find_free_port()), "JOB_SIZE": "2"}
    processes = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env={**base, **job, "JOB_RANK": str(rank), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=150)
            assert process.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for rank, result in enumerate(results):
        assert (result["rank"], result["world_size"], result["total"]) == (rank, 2, 3.0)
        # As Lightning's strategies do: world size num_nodes * devices, rank node_rank * devices + local_rank.
        assert result["told"] == [["world_size", 2], ["global_rank", rank]]
        assert result["same_grad"]
    # DDP averaged the gradients of the two ranks' inputs (all zeros and all ones): 0.5 * 2 rows.
    assert results[0]["grad"] == [[1.0, 1.0, 1.0]]
