"""End to end: real scripts through `handloom run`, `fabric.launch()` and simulated multi-node jobs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from handloom.launcher import find_free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parents[2]

TRAIN = """
import os, sys, torch
from handloom import Fabric
fabric = Fabric(**eval(os.environ.get("FABRIC_KWARGS", "{}")))
fabric.launch()
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
x = torch.full((2, 4), float(fabric.global_rank + 1))
for step in range(3):
    if step == int(os.environ.get("FAIL_AT_STEP", "-1")) and fabric.global_rank == 1:
        raise ValueError(f"rank 1 gives up at step {step}")
    fabric.backward(model(x).sum())
    opt.step()
    opt.zero_grad()
total = fabric.all_reduce(torch.tensor(float(fabric.global_rank)), reduce_op="sum")
weights = fabric.all_gather(model.module.weight.detach())
assert torch.equal(weights[0], weights[-1])
# One write per line: a write of under 4 KiB to a pipe is atomic, so ranks' lines never interleave.
sys.stdout.write(f"DONE rank={fabric.global_rank} world={fabric.world_size} node={fabric.node_rank}"
                 f" sum={total.item()} w={model.module.weight.sum().item():.6f}\\n")
sys.stdout.flush()
"""


def _run(
    args: list[str], tmp_path: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    command = [sys.executable, *[str(script) if a == "SCRIPT" else a for a in args]]
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout, check=False)


def _done_lines(output: str) -> list[str]:
    return sorted(re.findall(r"DONE rank=\d+ world=\d+ node=\d+ sum=\S+ w=-?[\d.]+", output))


def test_handloom_run_two_processes(tmp_path: Path) -> None:
    result = _run(
        ["-m", "handloom", "run", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "SCRIPT"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = _done_lines(result.stdout)
    assert len(lines) == 2 and all("world=2" in line and "sum=1.0" in line for line in lines)
    assert lines[0].split("w=")[1] == lines[1].split("w=")[1]


def test_fabric_launch_relaunches_the_script(tmp_path: Path) -> None:
    env = {"FABRIC_KWARGS": "dict(accelerator='cpu', devices=2, strategy='ddp')"}
    result = _run(["SCRIPT"], tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert len(_done_lines(result.stdout)) == 2


def test_two_simulated_nodes_on_localhost(tmp_path: Path) -> None:
    port = str(find_free_port())
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "handloom",
                "run",
                "--accelerator",
                "cpu",
                "--devices",
                "1",
                "--num-nodes",
                "2",
                "--node-rank",
                str(node),
                "--main-address",
                "127.0.0.1",
                "--main-port",
                port,
                str(script),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    lines = _done_lines("".join(o[0] for o in outputs))
    assert len(lines) == 2 and {"node=0", "node=1"} <= {w for line in lines for w in line.split()}
    assert all("world=2" in line and "sum=1.0" in line for line in lines)


def test_two_nodes_started_without_a_launcher(tmp_path: Path) -> None:
    # `python train.py` on each node with MASTER_ADDR/MASTER_PORT/NODE_RANK: fabric.launch() makes each
    # node's process the elastic agent, and the nodes must agree on the rendezvous to find each other.
    port = str(find_free_port())
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    kwargs = "dict(accelerator='cpu', devices=1, num_nodes=2, strategy='ddp')"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT / "src"),
                "FABRIC_KWARGS": kwargs,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "NODE_RANK": str(node),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    lines = _done_lines("".join(o[0] for o in outputs))
    assert len(lines) == 2 and all("world=2" in line and "sum=1.0" in line for line in lines)


@pytest.mark.parametrize("launcher", ["cli", "script"])
def test_a_rank_that_raises_ends_the_job_with_its_traceback(tmp_path: Path, launcher: str) -> None:
    env = {"FAIL_AT_STEP": "1"}
    if launcher == "cli":
        args = ["-m", "handloom", "run", "--accelerator", "cpu", "--devices", "2", "SCRIPT"]
    else:
        env["FABRIC_KWARGS"] = "dict(accelerator='cpu', devices=2, strategy='ddp')"
        args = ["SCRIPT"]
    start = time.monotonic()
    result = _run(args, tmp_path, env, timeout=90)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "ValueError: rank 1 gives up at step 1" in result.stderr
    assert "DONE" not in result.stdout
    assert elapsed < 45  # start-up included; the failure itself ends the job within seconds


def test_finished_jobs_exit_zero_every_time(tmp_path: Path) -> None:
    """Process-group teardown at exit must never abort ("terminate called without an active exception")."""
    codes = []
    for _ in range(4):
        result = _run(["-m", "handloom", "run", "--accelerator", "cpu", "--devices", "2", "SCRIPT"], tmp_path)
        codes.append(result.returncode)
        assert "terminate called" not in result.stderr
    assert codes == [0, 0, 0, 0]
