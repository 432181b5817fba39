"""End to end: ``examples/resumable_training.py`` killed mid-run and restarted ends bit for bit where
an uninterrupted run ends, in one process and in two under ``handloom run``.

The helpers are those of ``test_examples.py``.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from test_examples import EXAMPLES, REPO, SUBPROCESS_TIMEOUT_S, _env, run_example

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SCRIPT = EXAMPLES / "resumable_training.py"
MAX_STEPS, SAVE_EVERY, KEEP_LAST = 40, 10, 2
# 512 samples in batches of 16: 32 steps per epoch in one process, 16 per rank in two, so every
# run crosses at least one epoch boundary and the crash lands mid-epoch.
RUN_ARGS = (
    *("--max-steps", str(MAX_STEPS), "--save-every", str(SAVE_EVERY), "--keep-last", str(KEEP_LAST)),
    *("--num-samples", "512", "--batch-size", "16"),
)
HANDLOOM_RUN_DDP = ("-m", "handloom", "run", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp")
LAUNCHERS = {"1-process": (SCRIPT,), "ddp-2-processes": (*HANDLOOM_RUN_DDP, SCRIPT)}


def run_crashing(*args: str | Path) -> str:
    """Run ``python ARGS...``, which must die with a non-zero status; return its output."""
    command = [sys.executable, *map(str, args)]
    proc = subprocess.run(
        command,
        check=False,
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    output = (
        f"$ {' '.join(command)}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    )
    assert proc.returncode != 0, f"the run was meant to crash but exited 0\n{output}"
    assert not any(line.startswith("FINAL ") for line in proc.stdout.splitlines()), output
    return output


def _weights(path: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = torch.load(path, weights_only=True)
    return weights


@pytest.mark.parametrize(
    ("launcher", "stop_after", "extra"),
    [
        # Crash mid-epoch 3 steps after a save: the resume starts from that save.
        ("1-process", 23, ()),
        # Crash right after an async save was handed to the background: that checkpoint may be
        # half-written, so the resume starts from it or from the one before; either way exactly.
        ("ddp-2-processes", 20, ("--async-save",)),
    ],
    ids=["1-process", "ddp-2-processes-async"],
)
def test_killed_and_resumed_run_equals_uninterrupted_run(
    tmp_path: Path, launcher: str, stop_after: int, extra: tuple[str, ...]
) -> None:
    prefix = LAUNCHERS[launcher]
    full_dir, crash_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    with ThreadPoolExecutor(max_workers=2) as pool:  # the two first runs are independent
        uninterrupted = pool.submit(
            run_example,
            *prefix,
            *RUN_ARGS,
            *("--checkpoint-dir", full_dir, "--final-weights", tmp_path / "uninterrupted.pt"),
        )
        crashed = pool.submit(
            run_crashing,
            *prefix,
            *RUN_ARGS,
            *extra,
            *("--checkpoint-dir", crash_dir, "--stop-after", stop_after),
        )
        full: dict[str, Any] = uninterrupted.result()
        crash_output = crashed.result()

    assert f"simulated crash after step {stop_after}" in crash_output
    resumed = run_example(
        *prefix,
        *RUN_ARGS,
        *extra,
        *("--checkpoint-dir", crash_dir, "--final-weights", tmp_path / "resumed.pt"),
    )

    world_size = 2 if launcher.startswith("ddp") else 1
    assert (full["world_size"], resumed["world_size"]) == (world_size, world_size)
    assert (full["resumed_from"], full["step"]) == (0, MAX_STEPS)
    assert resumed["step"] == MAX_STEPS
    last_save = stop_after // SAVE_EVERY * SAVE_EVERY
    if extra:
        # The crash can take rank 0 down (torchrun stops the other workers once one exits) before
        # the background writes land: the newest complete checkpoint may be any earlier save.
        assert resumed["resumed_from"] in range(0, last_save + 1, SAVE_EVERY)
    else:
        assert resumed["resumed_from"] == last_save

    # The resumed run took the same steps on the same batches with the same random numbers.
    assert resumed["checksum"] == full["checksum"]
    assert resumed["loss"] == full["loss"]
    full_weights, resumed_weights = _weights(tmp_path / "uninterrupted.pt"), _weights(tmp_path / "resumed.pt")
    assert full_weights.keys() == resumed_weights.keys()
    for name, tensor in full_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name

    # keep_last: the newest checkpoints remain, and no leftover of the interrupted save. An async
    # save is not counted until it is complete, so one more may remain after the last one.
    saved_steps = range(SAVE_EVERY, MAX_STEPS + 1, SAVE_EVERY)
    names = [f"step-{step:09d}.ckpt" for step in saved_steps]
    assert sorted(p.name for p in full_dir.iterdir()) == names[-KEEP_LAST:]
    left = sorted(p.name for p in crash_dir.iterdir())
    assert left == (names[-len(left) :] if extra else names[-KEEP_LAST:])
    assert KEEP_LAST <= len(left) <= KEEP_LAST + (1 if extra else 0)


def test_an_elastic_restart_after_a_killed_worker_resumes_bit_identically(tmp_path: Path) -> None:
    # `handloom run --max-restarts 1`: rank 1 is SIGKILLed after step 23; the launcher restarts both
    # workers, which resume from the newest complete checkpoint (step 20) through the example's
    # one-line CheckpointFolder.resume, and finish with the uninterrupted run's exact weights.
    elastic = (*HANDLOOM_RUN_DDP, "--max-restarts", "1", SCRIPT)
    with ThreadPoolExecutor(max_workers=2) as pool:
        uninterrupted = pool.submit(
            run_example, *LAUNCHERS["ddp-2-processes"], *RUN_ARGS, "--checkpoint-dir", tmp_path / "full"
        )
        restarted = pool.submit(
            run_example,
            *elastic,
            *RUN_ARGS,
            *("--checkpoint-dir", tmp_path / "elastic", "--stop-after", "23", "--crash-rank", "1"),
        )
        full: dict[str, Any] = uninterrupted.result()
        resumed: dict[str, Any] = restarted.result()
    assert (resumed["resumed_from"], resumed["step"]) == (20, MAX_STEPS)
    assert resumed["checksum"] == full["checksum"]
    assert resumed["loss"] == full["loss"]
