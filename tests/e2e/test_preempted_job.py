"""End to end: one rank of a 2-process job gets SIGTERM; both ranks stop at the same step, save, and
the job exits 0; resumed from that checkpoint, the run ends bit for bit where an uninterrupted one ends.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from test_examples import REPO, SUBPROCESS_TIMEOUT_S, _env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(120),
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]

MAX_STEPS, SIGNAL_AT = 24, 10  # 12 steps per epoch and rank: the signal lands mid-epoch
HANDLOOM_RUN = ("-m", "handloom", "run", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp")

TRAIN = """
import hashlib, json, os, signal, sys
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from handloom import Fabric
from handloom.checkpoint import CheckpointFolder, RandomState

checkpoint_dir, max_steps, signal_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fabric = Fabric()
fabric.launch()
fabric.seed_everything(7)
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(96, 6, generator=g), torch.randn(96, 1, generator=g))
model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=0.01))
loader = fabric.setup_dataloaders(DataLoader(data, batch_size=4, shuffle=True))
folder = CheckpointFolder(checkpoint_dir)
state = {"model": model, "optimizer": optimizer, "loader": loader, "rng": RandomState(), "step": 0}
latest = fabric.broadcast(folder.latest())
if latest is not None:
    fabric.load(latest, state)
resumed_from = state["step"]
preempted = False
while state["step"] < max_steps and not preempted:
    for x, y in loader:
        loss = nn.functional.mse_loss(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        state["step"] += 1
        if state["step"] == signal_at and fabric.global_rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler does, to this rank alone
        if fabric.preemption_requested():
            fabric.save(folder.path(state["step"]), state)
            preempted = True
        if preempted or state["step"] >= max_steps:
            break
sys.stdout.write(f"STOP rank={fabric.global_rank} step={state['step']} preempted={preempted}\\n")
sys.stdout.flush()
digest = hashlib.sha256()
for name, value in sorted(model.state_dict().items()):
    digest.update(name.encode() + value.detach().contiguous().view(torch.uint8).numpy().tobytes())
final = {"step": state["step"], "resumed_from": resumed_from, "checksum": digest.hexdigest()}
# One write: print() writes the text and the newline apart, and another rank's line can land between.
if fabric.is_global_zero:
    sys.stdout.write("FINAL " + json.dumps(final) + "\\n")
    sys.stdout.flush()
"""


def _train(script: Path, checkpoint_dir: Path, signal_at: int = -1) -> tuple[dict[str, Any], list[str]]:
    """Run the script on 2 processes; return rank 0's FINAL line and every rank's STOP line."""
    args = (script, checkpoint_dir, MAX_STEPS, signal_at)
    command = [sys.executable, *HANDLOOM_RUN, *map(str, args)]
    env, timeout = _env(), SUBPROCESS_TIMEOUT_S
    proc = subprocess.run(
        command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = f"$ {' '.join(command)}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr}"
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{output}"
    finals = [line for line in proc.stdout.splitlines() if line.startswith("FINAL ")]
    assert len(finals) == 1, output
    return json.loads(finals[0].removeprefix("FINAL ")), sorted(re.findall(r"STOP rank=.*", proc.stdout))


def test_sigterm_to_one_rank_stops_both_at_one_step_and_the_resume_is_exact(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    with ThreadPoolExecutor(max_workers=2) as pool:  # independent runs
        uninterrupted = pool.submit(_train, script, tmp_path / "full")
        preempted = pool.submit(_train, script, tmp_path / "preempted", SIGNAL_AT)
        (full, full_stops), (stopped, stops) = uninterrupted.result(), preempted.result()

    # Rank 1 alone got SIGTERM; both ranks stopped after the same step and the job exited 0.
    assert stops == [f"STOP rank={rank} step={SIGNAL_AT} preempted=True" for rank in (0, 1)]
    assert full_stops == [f"STOP rank={rank} step={MAX_STEPS} preempted=False" for rank in (0, 1)]
    assert stopped["step"] == SIGNAL_AT
    checkpoint = tmp_path / "preempted" / f"step-{SIGNAL_AT:09d}.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["step"] == SIGNAL_AT and "0.weight" in saved["model"]

    resumed, resumed_stops = _train(script, tmp_path / "preempted")
    assert resumed_stops == [f"STOP rank={rank} step={MAX_STEPS} preempted=False" for rank in (0, 1)]
    assert (resumed["resumed_from"], resumed["step"]) == (SIGNAL_AT, MAX_STEPS)
    assert resumed["checksum"] == full["checksum"]  # same weights, bit for bit
