"""End to end: one rank raises or is SIGKILLed mid-training, and the whole job stops within 15 s.

Every launch path: ``handloom run``, ``fabric.launch()`` re-running the script, external
``torchrun``, and processes started by a cluster scheduler (Slurm's ``srun``, simulated by starting
each task with the ``SLURM_*`` variables srun sets). The failing rank writes the time of its fault
to a file just before it happens; the test measures from there to the moment the last process of
the job has exited.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from handloom.launcher import find_free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parents[2]
STOP_WITHIN_S = 15.0
# Variables of an enclosing launcher that must not leak into the jobs started here.
_LAUNCHER_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")

TRAIN = """
import os, signal, sys, time, torch
from handloom import Fabric
fabric = Fabric(**eval(os.environ.get("FABRIC_KWARGS", "{}")))
fabric.launch()
model = torch.nn.Linear(8, 1)
model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
fault, fault_rank, fault_step = os.environ["FAULT"], int(os.environ["FAULT_RANK"]), 5
for step in range(10_000):  # far longer than the test waits: only the fault ends this job
    if step == fault_step and fabric.global_rank == fault_rank:
        with open(os.environ["FAULT_TIME_FILE"], "w") as handle:
            handle.write(repr(time.time()))
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError(f"rank {fault_rank} gives up at step {step}")
    fabric.backward(model(torch.randn(4, 8)).sum())
    optimizer.step()
    optimizer.zero_grad()
    time.sleep(0.01)
"""


def _env(tmp_path: Path, fault: str, **extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in _LAUNCHER_VARS}
    return {
        **env,
        "PYTHONPATH": str(ROOT / "src"),
        "FAULT": fault,
        "FAULT_RANK": "1",
        "FAULT_TIME_FILE": str(tmp_path / "fault-time"),
        **extra,
    }


def _wait(procs: list[subprocess.Popen[str]], tmp_path: Path) -> tuple[list[int], str, float]:
    """Wait for every process; return exit codes, all output, and seconds from the fault to the end."""
    outputs = [proc.communicate(timeout=90) for proc in procs]
    ended = time.time()
    fault_time = float((tmp_path / "fault-time").read_text())
    text = "\n".join(out + err for out, err in outputs)
    return [proc.returncode for proc in procs], text, ended - fault_time


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(
    ("launcher", "fault"),
    [("handloom-run", "kill"), ("fabric-launch", "kill"), ("torchrun", "raise"), ("torchrun", "kill")],
)
def test_one_failing_rank_stops_the_whole_job_quickly(tmp_path: Path, launcher: str, fault: str) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    env = _env(tmp_path, fault)
    python = [sys.executable]
    if launcher == "handloom-run":
        command = [*python, "-m", "handloom", "run", "--accelerator", "cpu", "--devices", "2", str(script)]
    elif launcher == "torchrun":
        command = [*python, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)]
        env["FABRIC_KWARGS"] = "dict(accelerator='cpu', devices=2, strategy='ddp')"
    else:
        command = [*python, str(script)]
        env["FABRIC_KWARGS"] = "dict(accelerator='cpu', devices=2, strategy='ddp')"
    codes, output, stopped_after = _wait([_start(command, env)], tmp_path)
    assert codes[0] != 0, output[-3000:]
    assert stopped_after < STOP_WITHIN_S, output[-3000:]
    if fault == "raise":
        assert "ValueError: rank 1 gives up at step 5" in output  # the failing rank's traceback
    elif launcher == "fabric-launch":  # the caller is rank 0 and watches the other ranks itself
        assert "Signal 9 (SIGKILL)" in output and "local rank 1" in output, output[-3000:]
    else:
        assert "Signal 9 (SIGKILL)" in output and "rank      : 1" in output, output[-3000:]


def test_a_killed_task_under_a_scheduler_stops_the_other_tasks_quickly(tmp_path: Path) -> None:
    # srun starts every task itself, so no agent watches them: the survivors learn of the death
    # from their process group (gloo fails on the closed connection) and exit non-zero.
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    port = str(find_free_port())
    procs = []
    for rank in range(2):
        slurm = {
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "2", "SLURM_NNODES": "1",
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0",
            "SLURM_NODELIST": "localhost", "SLURM_TASKS_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port, "FABRIC_KWARGS": "dict(accelerator='cpu', devices=2, strategy='ddp')",
        }  # fmt: skip
        procs.append(_start([sys.executable, str(script)], _env(tmp_path, "kill", **slurm)))
    codes, output, stopped_after = _wait(procs, tmp_path)
    assert codes[1] == -9 and codes[0] != 0, output[-3000:]
    assert stopped_after < STOP_WITHIN_S, output[-3000:]
    # The survivor's own error says its peer went away, so the user looks at the dead task's log.
    assert "[rank0]:" in output, output[-3000:]
    assert re.search(r"Connection (closed|reset) by peer", output), output[-3000:]
