"""End to end: the ecosystem examples (CNN, FSDP language model, LoRA, k-fold, a minimal Trainer).

Each script runs on 2 CPU processes and ends with one line ``FINAL {json}`` printed by rank 0;
the tests assert on it and on the files the scripts write. The helpers are those of
``test_examples.py``.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from test_examples import EXAMPLES, run_example  # the same runner as the other example tests

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _import_example(name: str) -> ModuleType:
    """Import ``examples/NAME.py`` as a module (its ``main`` does not run)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


# --- image_classifier.py ---------------------------------------------------------------------------------
def test_image_classifier_learns_the_patterns() -> None:
    result = run_example(EXAMPLES / "image_classifier.py", "--epochs", "2", "--num-train", "1536")

    assert result["world_size"] == 2
    chance = 1 / result["num_classes"]
    assert result["initial_val_accuracy"] < chance + 0.15  # an untrained network guesses
    assert result["val_accuracy"] > 0.9
    assert result["val_loss"] < 0.5 * result["initial_val_loss"]
    first_loss, last_loss = result["train_losses"]
    assert last_loss < 0.5 * first_loss


# --- language_model.py -----------------------------------------------------------------------------------
def test_language_model_learns_under_fsdp_and_saves_a_sharded_checkpoint(tmp_path: Path) -> None:
    steps = 40
    result = run_example(
        EXAMPLES / "language_model.py", "--steps", str(steps), "--checkpoint-dir", tmp_path / "ckpt"
    )

    assert result["world_size"] == 2
    assert result["steps"] == steps
    assert result["first_loss"] > 0.9 * result["initial_loss_bound"]  # starts near chance
    assert result["last_loss"] < 0.4 * result["first_loss"]
    # Each rank holds about half of the parameters (FSDP pads uneven shards a little).
    assert result["local_params"] < 0.6 * result["num_params"]

    # Every rank wrote its shards into one torch.distributed.checkpoint directory ...
    path = Path(result["checkpoint"])
    assert path.parent == tmp_path / "ckpt"
    assert (path / ".metadata").is_file()
    assert len(list(path.glob("*.distcp"))) == 2
    # ... which loads in one process without any process group, into the plain model.
    from handloom import Fabric

    saved = Fabric(accelerator="cpu", devices=1).load(path)
    assert saved["step"] == steps
    assert saved["optimizer"]["state"]  # AdamW moments were saved too
    example = _import_example("language_model")
    config = example.Config(**saved["config"])
    model = example.Transformer(config)
    model.load_state_dict(saved["model"])  # strict: no FSDP or checkpoint-wrapper names in the keys
    inputs, targets = example.make_dataset(64, config, seed=123).tensors
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).item()
    assert loss < 0.5 * result["first_loss"]  # the saved weights are the trained ones


# --- lora_finetune.py ------------------------------------------------------------------------------------
def test_lora_finetune_trains_and_saves_only_the_adapter(tmp_path: Path) -> None:
    result = run_example(EXAMPLES / "lora_finetune.py", "--steps", "40", "--output-dir", tmp_path)

    assert result["world_size"] == 2
    assert 0 < result["trainable_params"] < 0.05 * result["all_params"]
    assert result["first_loss"] > 0.9 * result["initial_loss_bound"]
    assert result["last_loss"] < 0.75 * result["first_loss"]
    assert result["eval_loss"] < result["initial_eval_loss"] - 1.0
    assert result["base_weights_unchanged"] is True

    path = Path(result["adapter"])
    assert path == tmp_path / "adapter.ckpt"
    saved = torch.load(path, weights_only=True)
    assert list(saved) == ["model"]  # exactly the saved keys: the adapter
    assert saved["model"]
    assert all("lora" in key for key in saved["model"])
    assert sum(t.numel() for t in saved["model"].values()) == result["trainable_params"]
    # Base weights + the adapter file give back the fine-tuned model exactly.
    assert result["restored_eval_loss"] == pytest.approx(result["eval_loss"], rel=1e-6)


# --- kfold.py --------------------------------------------------------------------------------------------
def test_kfold_trains_a_fresh_model_per_fold() -> None:
    folds = 4
    result = run_example(
        EXAMPLES / "kfold.py", "--folds", str(folds), "--epochs", "2", "--num-samples", "800"
    )

    assert result["world_size"] == 2
    accuracies = result["fold_accuracies"]
    assert len(accuracies) == folds
    chance = 1 / result["num_classes"]
    assert min(accuracies) > chance + 0.4
    assert result["mean_accuracy"] == pytest.approx(sum(accuracies) / folds)
    # The SubsetRandomSampler of each fold was sharded: every training sample read once per epoch.
    assert result["folds_read_once"] == [True] * folds


# --- minimal_trainer.py ----------------------------------------------------------------------------------
FirstRun = tuple[dict[str, Any], Path]
TRAINER_ARGS = ("--num-samples", "1280", "--batch-size", "16", "--accumulation-steps", "2")
# 1280 samples: 1024 to train, split over 2 ranks, in micro-batches of 16, 2 per optimizer step.
TRAINER_BATCHES_PER_EPOCH = 1024 // 2 // 16
TRAINER_STEPS_PER_EPOCH = math.ceil(TRAINER_BATCHES_PER_EPOCH / 2)


@pytest.fixture(scope="module")
def trainer_first_run(tmp_path_factory: pytest.TempPathFactory) -> FirstRun:
    checkpoint_dir = tmp_path_factory.mktemp("trainer") / "checkpoints"
    result = run_example(
        EXAMPLES / "minimal_trainer.py", "--epochs", "2", *TRAINER_ARGS, "--checkpoint-dir", checkpoint_dir
    )
    return result, checkpoint_dir


def test_minimal_trainer_fits_with_accumulation_clipping_and_callbacks(trainer_first_run: FirstRun) -> None:
    result, checkpoint_dir = trainer_first_run

    assert result["world_size"] == 2
    assert result["epochs"] == 2
    assert result["global_step"] == 2 * TRAINER_STEPS_PER_EPOCH  # one optimizer step per 2 micro-batches
    # The callback saw every hook: each micro-batch, each optimizer step, each validation.
    assert result["num_train_batches_seen"] == 2 * TRAINER_BATCHES_PER_EPOCH
    assert result["grad_norms_seen"] == result["global_step"]
    assert result["max_grad_norm_seen"] > 1.0  # clipping to 1.0 had something to do
    assert len(result["val_losses"]) == 2
    assert result["val_losses"][-1] < result["val_losses"][0]
    assert result["train_loss"] < 0.5 * result["first_batch_loss"]
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == ["epoch-0001.ckpt", "epoch-0002.ckpt"]
    saved = torch.load(checkpoint_dir / "epoch-0002.ckpt", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (2, result["global_step"])
    assert not any(key.startswith("module.") for key in saved["model"])


def test_minimal_trainer_resumes_under_handloom_run(trainer_first_run: FirstRun) -> None:
    first, checkpoint_dir = trainer_first_run
    result = run_example(
        *("-m", "handloom", "run", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"),
        EXAMPLES / "minimal_trainer.py",
        *("--epochs", "3", *TRAINER_ARGS, "--checkpoint-dir", checkpoint_dir, "--resume"),
    )

    assert result["world_size"] == 2
    assert result["resumed_from"] == str(checkpoint_dir / "epoch-0002.ckpt")
    assert result["epochs"] == 3
    assert result["global_step"] == 3 * TRAINER_STEPS_PER_EPOCH  # counting on from the checkpoint
    assert result["num_train_batches_seen"] == TRAINER_BATCHES_PER_EPOCH  # only epoch 3 ran
    # The restored model starts where the first run stopped, not from scratch.
    assert result["first_batch_loss"] < 0.5 * first["first_batch_loss"]
    assert result["val_loss"] <= first["val_loss"]
    assert (checkpoint_dir / "epoch-0003.ckpt").is_file()
