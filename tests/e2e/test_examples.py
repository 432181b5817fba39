"""End to end: every script in ``examples/`` runs on 2 CPU processes and does what it says.

Each example ends with one line ``FINAL {json}`` printed by rank 0; the tests assert on it. The
scripts start their own processes (``python examples/X.py``) and, for the main demo, also run
under ``python -m handloom run``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SUBPROCESS_TIMEOUT_S = 150

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

# Variables that would make a script believe it was started by a launcher or a scheduler.
_LAUNCH_VARS = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
    "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_NTASKS", "LSB_JOBID", "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
)  # fmt: skip


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCH_VARS and not k.startswith(("HANDLOOM_", "TORCHELASTIC_"))
    }
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    return env


def run_example(*args: str | Path) -> dict[str, Any]:
    """Run ``python ARGS...`` from the repository root; return the parsed FINAL line."""
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
        f"$ {' '.join(command)}\n--- stdout (end) ---\n{proc.stdout[-4000:]}"
        f"\n--- stderr (end) ---\n{proc.stderr[-4000:]}"
    )
    finals = [line for line in proc.stdout.splitlines() if line.startswith("FINAL ")]
    # Every finished run must exit 0: no abort at interpreter exit either.
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{output}"
    assert len(finals) == 1, f"expected exactly one FINAL line (from rank 0 only)\n{output}"
    result: dict[str, Any] = json.loads(finals[0].removeprefix("FINAL "))
    return result


# --- train_classifier.py: the main demo --------------------------------------------------------------
FirstRun = tuple[dict[str, Any], Path]
CLASSIFIER_ARGS = ("--num-samples", "1000", "--batch-size", "32")
# 1000 samples: 800 to train, split over 2 ranks, in batches of 32.
CLASSIFIER_STEPS_PER_EPOCH = math.ceil(800 / 2 / 32)


@pytest.fixture(scope="module")
def classifier_first_run(tmp_path_factory: pytest.TempPathFactory) -> FirstRun:
    """Two epochs with a checkpoint after each, the script launching its own 2 processes."""
    checkpoint_dir = tmp_path_factory.mktemp("classifier") / "checkpoints"
    result = run_example(
        EXAMPLES / "train_classifier.py",
        *("--devices", "2", "--strategy", "ddp", "--epochs", "2"),
        *CLASSIFIER_ARGS,
        *("--checkpoint-dir", checkpoint_dir),
    )
    return result, checkpoint_dir


def test_train_classifier_learns_and_saves_checkpoints(classifier_first_run: FirstRun) -> None:
    result, checkpoint_dir = classifier_first_run

    assert result["world_size"] == 2
    assert result["start_epoch"] == 0
    assert result["steps"] == 2 * CLASSIFIER_STEPS_PER_EPOCH
    first_loss, last_loss = result["train_losses"]
    assert last_loss < 0.5 * first_loss
    assert result["initial_val_accuracy"] < 0.6  # four classes: an untrained model is near chance
    assert result["val_accuracy"] > 0.9
    assert result["val_loss"] < result["initial_val_loss"]

    assert sorted(p.name for p in checkpoint_dir.iterdir()) == ["epoch001.ckpt", "epoch002.ckpt"]
    saved = torch.load(checkpoint_dir / "epoch002.ckpt", weights_only=True)
    assert saved["epoch"] == 2
    assert saved["step"] == result["steps"]
    assert not any(key.startswith("module.") for key in saved["model"])  # no DDP prefix in the file
    assert saved["optimizer"]["state"]  # AdamW moments were saved, not just the hyperparameters


def test_train_classifier_resumes_under_handloom_run(classifier_first_run: FirstRun) -> None:
    first, checkpoint_dir = classifier_first_run
    result = run_example(
        *("-m", "handloom", "run", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"),
        EXAMPLES / "train_classifier.py",
        "--epochs",
        "3",
        *CLASSIFIER_ARGS,
        *("--checkpoint-dir", checkpoint_dir, "--resume"),
    )

    assert result["world_size"] == 2
    assert result["start_epoch"] == 2  # resumed from the newest checkpoint: only epoch 3 is left
    assert len(result["train_losses"]) == 1
    assert result["steps"] == 3 * CLASSIFIER_STEPS_PER_EPOCH
    # The restored model scores exactly as the saved one did at the end of the first run.
    assert result["initial_val_loss"] == pytest.approx(first["val_loss"], rel=1e-5)
    assert result["initial_val_accuracy"] == first["val_accuracy"]
    assert result["val_accuracy"] > 0.9
    assert (checkpoint_dir / "epoch003.ckpt").is_file()


# --- the other examples ------------------------------------------------------------------------------
def test_gradient_accumulation_syncs_once_per_step_and_clips() -> None:
    result = run_example(
        EXAMPLES / "gradient_accumulation.py",
        *("--devices", "2", "--strategy", "ddp", "--epochs", "4", "--accumulation-steps", "4"),
        *("--num-samples", "1024", "--batch-size", "16", "--max-grad-norm", "1.0"),
    )

    assert result["world_size"] == 2
    assert result["micro_batches_per_epoch"] == 1024 // 2 // 16
    assert result["optimizer_steps"] == 4 * result["micro_batches_per_epoch"] // 4
    # Micro-steps inside no_backward_sync keep each rank's own gradients; the last one averages them.
    assert result["grads_equal_while_accumulating"] is False
    assert result["grads_equal_after_sync"] is True
    assert result["params_equal_across_ranks"] is True
    assert result["loss"] < 0.5 * result["first_loss"]
    assert math.isfinite(result["grad_norm"])
    assert result["grad_norm"] > 0
    assert result["max_grad_norm_seen"] > 1.0  # the early steps were clipped ...
    assert 0 < result["clipped_steps"] < result["optimizer_steps"]  # ... but not every step


def test_gan_trains_two_models_in_bf16_mixed() -> None:
    result = run_example(
        EXAMPLES / "gan.py", *("--devices", "2", "--strategy", "ddp", "--precision", "bf16-mixed")
    )

    assert result["world_size"] == 2
    assert result["compute_dtype"] == "bfloat16"
    assert math.isfinite(result["d_loss"])
    assert math.isfinite(result["g_loss"])
    # The generator moved its samples onto the real distribution.
    assert result["mean_distance"] < 0.5 * result["initial_mean_distance"]
    assert result["std"] > result["initial_std"]


def test_metrics_across_ranks_add_up() -> None:
    num_samples = 1000
    result = run_example(
        EXAMPLES / "metrics_across_ranks.py",
        *("--devices", "2", "--strategy", "ddp", "--num-samples", str(num_samples)),
    )

    assert result["world_size"] == 2
    assert result["n_total"] == num_samples  # each sample counted once, on exactly one rank
    assert result["per_rank_n_total"] == [num_samples // 2, num_samples // 2]
    assert result["seen_indices_cover_dataset_once"] is True
    assert result["num_wrong_gathered"] == result["n_total"] - result["n_correct"]
    assert result["accuracy"] == pytest.approx(result["n_correct"] / result["n_total"])
    assert result["accuracy"] > 0.85
    assert result["loss"] < result["first_loss"]
    assert result["loss"] == pytest.approx(sum(result["per_rank_loss"]) / 2, rel=1e-5)


def test_switch_strategies_gives_the_same_model() -> None:
    single = run_example(EXAMPLES / "switch_strategies.py", "--strategy", "single")
    spawned = run_example(EXAMPLES / "switch_strategies.py", "--strategy", "ddp_spawn", "--devices", "2")

    assert (single["strategy"], single["world_size"]) == ("single_device", 1)
    assert (spawned["strategy"], spawned["world_size"]) == ("ddp_spawn", 2)
    # launch(train) handed rank 0's result back to the launching process.
    assert spawned["returned_from_another_process"] is True
    assert spawned["global_rank"] == 0
    assert spawned["steps_per_epoch"] == single["steps_per_epoch"]
    # Same global batches and averaged gradients: the same model up to rounding.
    assert spawned["loss"] == pytest.approx(single["loss"], rel=1e-4)
    assert spawned["accuracy"] == single["accuracy"]
    assert single["accuracy"] > 0.9

    # FSDP under `handloom run`: the same loop on sharded parameters gives the same model.
    sharded = run_example(
        "-m", "handloom", "run", "--accelerator", "cpu", "--devices", "2", "--strategy", "fsdp",
        EXAMPLES / "switch_strategies.py",
    )  # fmt: skip
    assert (sharded["strategy"], sharded["world_size"]) == ("fsdp", 2)
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-4)
    assert sharded["accuracy"] == single["accuracy"]


@pytest.mark.parametrize(
    "args",
    [["--devices", "2"], ["--devices", "4", "--data-parallel", "2", "--tensor-parallel", "2"]],
    ids=["tp2", "dp2xtp2"],
)
def test_tensor_parallel_example_learns(args: list[str]) -> None:
    final = run_example(EXAMPLES / "tensor_parallel.py", "--steps", "20", *args)
    assert final["world_size"] == int(args[1])
    assert final["data_parallel"] * final["tensor_parallel"] == final["world_size"]
    assert final["first_loss"] > 0.9 * final["initial_loss_bound"]  # starts near chance
    assert final["last_loss"] < 0.5 * final["first_loss"]
