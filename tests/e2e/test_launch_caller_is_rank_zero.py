"""``fabric.launch()`` with ``strategy="ddp"`` and no launcher, as in Lightning: the calling process
becomes rank 0 and returns from ``launch()``; the other ranks re-run the script. A failing rank
still ends the whole job quickly, and ``launch(fn)`` leaves the caller's environment as it was."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from handloom import Fabric

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import os, sys, torch
from handloom import Fabric

def say(line):  # one write per line: lines of several ranks never interleave
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()

say(f"BEFORE pid={os.getpid()}")
fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
try:
    returned = fabric.launch()
    total = fabric.all_reduce(torch.tensor(float(fabric.global_rank + 1)), reduce_op="sum")
    say(f"AFTER pid={os.getpid()} rank={fabric.global_rank} world={fabric.world_size} sum={total.item()}"
        f" returned={returned}")
    if os.environ.get("EXIT_ON_RANK_ONE") and fabric.global_rank == 1:
        os._exit(3)
    if os.environ.get("RAISE"):
        raise ValueError("handled by the script")
    while os.environ.get("EXIT_ON_RANK_ONE"):
        fabric.barrier()
except ValueError as error:
    say(f"CAUGHT rank={fabric.global_rank} {error}")
say(f"END rank={fabric.global_rank}")
"""


def _start(tmp_path: Path, **env: str) -> subprocess.Popen[str]:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **env}
    return subprocess.Popen(
        [sys.executable, str(script)], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_the_caller_becomes_rank_zero_and_returns_from_launch(tmp_path: Path) -> None:
    proc = _start(tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    before = re.findall(r"BEFORE pid=(\d+)", out)
    after = dict(re.findall(r"AFTER pid=(\d+) rank=(\d) world=2 sum=3.0 returned=None", out))
    assert len(before) == 2, out  # code before launch() runs once in each process
    assert after[str(proc.pid)] == "0", out  # the caller itself is rank 0
    assert sorted(after.values()) == ["0", "1"] and set(after) == set(before), out
    assert sorted(re.findall(r"END rank=(\d)", out)) == ["0", "1"], out


def test_an_exception_after_launch_is_the_scripts_to_handle(tmp_path: Path) -> None:
    proc = _start(tmp_path, RAISE="1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert sorted(re.findall(r"CAUGHT rank=(\d) handled by the script", out)) == ["0", "1"], out


def test_a_rank_that_dies_ends_the_callers_job_quickly(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = _start(tmp_path, EXIT_ON_RANK_ONE="1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    assert "local rank 1" in err and "exit code 3" in err and "stopping the other ranks" in err, err[-3000:]
    assert "END rank=0" not in out
    assert time.monotonic() - start < 45  # start-up included; the death itself ends the job in seconds


HAND_STARTED = """
import sys, torch
from handloom import Fabric
fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
fabric.launch()
total = fabric.all_reduce(torch.tensor(float(fabric.global_rank + 1)), reduce_op="sum")
sys.stdout.write(f"JOINED rank={fabric.global_rank} world={fabric.world_size} sum={total.item()}\\n")
"""


def test_processes_started_by_hand_with_local_rank_join_as_in_lightning(tmp_path: Path) -> None:
    # Lightning's default environment: LOCAL_RANK (with NODE_RANK, MASTER_ADDR, MASTER_PORT) set on
    # every process means they were all started outside Fabric, which then starts nothing.
    from handloom.launcher import find_free_port

    script = tmp_path / "joined.py"
    script.write_text(HAND_STARTED)
    port = str(find_free_port())
    procs = []
    for local_rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "NODE_RANK": "0", "LOCAL_RANK": str(local_rank)}  # fmt: skip
        procs.append(
            subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
        )
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert outputs == ["JOINED rank=0 world=2 sum=3.0\n", "JOINED rank=1 world=2 sum=3.0\n"]


def _nothing(fabric: Fabric) -> int:
    return int(fabric.all_reduce(torch.tensor(1.0), reduce_op="sum").item())


def test_launch_of_a_function_leaves_the_callers_environment_alone() -> None:
    before = dict(os.environ)
    assert Fabric(accelerator="cpu", devices=2, strategy="ddp_fork").launch(_nothing) == 2
    assert "TORCHELASTIC_SIGNALS_TO_HANDLE" not in os.environ or "TORCHELASTIC_SIGNALS_TO_HANDLE" in before
    assert dict(os.environ) == before


def _draws(fabric: Fabric) -> tuple[list[float], bool]:
    return torch.rand(2).tolist(), torch.are_deterministic_algorithms_enabled()


def test_spawned_workers_start_from_the_parents_random_and_determinism_state() -> None:
    # As in Lightning's spawn launcher: a seed set before launch(fn) holds in the workers.
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    fabric.seed_everything(42)
    expected = torch.rand(2).tolist()
    fabric.seed_everything(42)
    torch.use_deterministic_algorithms(True)
    try:
        draws, deterministic = fabric.launch(_draws)
    finally:
        torch.use_deterministic_algorithms(False)
    assert draws == expected and deterministic


def test_sharded_strategies_reseed_every_process_at_setup_as_lightning_does() -> None:
    from handloom.strategies import FSDPStrategy

    fabric = Fabric(accelerator="cpu", devices=2, strategy=FSDPStrategy(start_method="fork"))
    fabric.seed_everything(7)
    expected = torch.rand(2).tolist()
    torch.rand(5)  # consumed before launch: FSDP's set-up re-seeds from PL_GLOBAL_SEED anyway
    draws, _ = fabric.launch(_draws)
    assert draws == expected
