"""Train a small classifier on several CPU processes: the article's "migrated loop", end to end.

A multi-layer perceptron learns to tell apart Gaussian clusters (synthetic data, nothing is
downloaded). The loop is plain PyTorch; Fabric launches the processes, wraps the model in
DistributedDataParallel, shards the data and averages the metrics across ranks.

Run it either way::

    python examples/train_classifier.py --epochs 3
    handloom run --accelerator cpu --devices 2 --strategy ddp examples/train_classifier.py --epochs 3

Save a checkpoint after every epoch, then carry on from the newest one::

    python examples/train_classifier.py --epochs 2 --checkpoint-dir checkpoints
    python examples/train_classifier.py --epochs 4 --checkpoint-dir checkpoints --resume

The last line printed is machine readable: ``FINAL {"val_accuracy": ..., ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from handloom import Fabric
from handloom.utilities import progress_bar

# Used when the script launches itself; under `handloom run` the launcher's flags decide instead.
STANDALONE_DEFAULTS = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="samples per process and step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-samples", type=int, default=2000, help="size of the synthetic dataset")
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=None, help="save a checkpoint after each epoch"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="PATH",
        help="resume from PATH, or from the newest checkpoint in --checkpoint-dir when no PATH is given",
    )
    fabric_group = parser.add_argument_group("Fabric (under `handloom run`, the launcher's flags apply)")
    fabric_group.add_argument("--accelerator", default=None, help="default: cpu")
    fabric_group.add_argument("--devices", type=int, default=None, help="default: 2")
    fabric_group.add_argument("--strategy", default=None, help="default: ddp")
    fabric_group.add_argument("--precision", default=None, help="default: 32-true")
    args = parser.parse_args(argv)
    if args.resume == "latest" and args.checkpoint_dir is None:
        parser.error("--resume without a PATH resumes from --checkpoint-dir; pass --checkpoint-dir DIR too.")
    return args


def build_fabric(args: argparse.Namespace) -> Fabric:
    """Create Fabric from the flags given here; ``handloom run`` supplies the ones left out."""
    options = {
        "accelerator": args.accelerator,
        "devices": args.devices,
        "strategy": args.strategy,
        "precision": args.precision,
    }
    if os.environ.get("HANDLOOM_CLI_USED") != "1":
        options = {
            name: STANDALONE_DEFAULTS.get(name) if value is None else value for name, value in options.items()
        }
    return Fabric(**{name: value for name, value in options.items() if value is not None})


def make_dataset(num_samples: int, num_classes: int, num_features: int = 16, seed: int = 0) -> TensorDataset:
    """Gaussian clusters, one per class. Every rank builds the same data from the same seed."""
    generator = torch.Generator().manual_seed(seed)
    centers = 1.0 * torch.randn(num_classes, num_features, generator=generator)
    targets = torch.randint(num_classes, (num_samples,), generator=generator)
    inputs = centers[targets] + torch.randn(num_samples, num_features, generator=generator)
    return TensorDataset(inputs, targets)


def build_model(num_features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(num_features, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def save_checkpoint(fabric: Fabric, model: Any, optimizer: Any, epoch: int, step: int, path: Path) -> None:
    """Save a checkpoint with Fabric: every rank calls it, rank 0 writes the file."""
    state = {
        "model": model,  # Fabric extracts the state dict from behind the DDP wrapper
        "optimizer": optimizer,
        "epoch": epoch,
        "step": step,
    }
    fabric.save(path, state)


def load_checkpoint(fabric: Fabric, model: Any, optimizer: Any, path: Path) -> tuple[int, int]:
    """Load a checkpoint into the model and optimizer in place; return the saved epoch and step."""
    state = {
        "model": model,
        "optimizer": optimizer,
        "epoch": 0,
        "step": 0,
    }
    fabric.load(path, state)
    return state["epoch"], state["step"]


def checkpoint_path(checkpoint_dir: Path, epoch: int) -> Path:
    return checkpoint_dir / f"epoch{epoch:03d}.ckpt"


def newest_checkpoint(checkpoint_dir: Path) -> Path:
    found = sorted(p for p in checkpoint_dir.glob("epoch*.ckpt") if re.fullmatch(r"epoch\d+\.ckpt", p.name))
    if not found:
        raise FileNotFoundError(
            f"--resume found no checkpoint in {str(checkpoint_dir)!r}. Train with --checkpoint-dir first,"
            " or pass --resume PATH."
        )
    return found[-1]


@torch.no_grad()
def evaluate(fabric: Fabric, model: Any, loader: Any) -> tuple[float, float]:
    """Mean loss and accuracy over the validation data of all ranks."""
    model.eval()
    loss_sum = torch.tensor(0.0, device=fabric.device)
    n_correct = torch.tensor(0, device=fabric.device)
    n_total = torch.tensor(0, device=fabric.device)
    for inputs, targets in loader:
        outputs = model(inputs)
        loss_sum += nn.functional.cross_entropy(outputs, targets, reduction="sum")
        n_correct += (outputs.argmax(dim=-1) == targets).sum()
        n_total += targets.size(0)
    model.train()
    loss_sum, n_correct, n_total = fabric.all_reduce((loss_sum, n_correct, n_total), reduce_op="sum")
    return loss_sum.item() / n_total.item(), n_correct.item() / n_total.item()


def main(args: argparse.Namespace) -> None:
    fabric = build_fabric(args)
    fabric.launch()  # with strategy="ddp" this re-runs the script once per device; the rest runs there
    fabric.seed_everything(args.seed)

    dataset = make_dataset(args.num_samples, args.num_classes, seed=args.seed)
    num_val = args.num_samples // 5
    train_set, val_set = torch.utils.data.random_split(
        dataset, [args.num_samples - num_val, num_val], generator=torch.Generator().manual_seed(args.seed)
    )
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=args.batch_size)

    model = build_model(num_features=dataset.tensors[0].shape[1], num_classes=args.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer = fabric.setup(model, optimizer)
    train_loader, val_loader = fabric.setup_dataloaders(train_loader, val_loader)
    criterion = nn.CrossEntropyLoss()

    start_epoch, step = 0, 0
    if args.resume is not None:
        latest = args.resume == "latest"
        resume_path = newest_checkpoint(args.checkpoint_dir) if latest else Path(args.resume)
        start_epoch, step = load_checkpoint(fabric, model, optimizer, resume_path)
        fabric.print(f"Resumed from {resume_path}: {start_epoch} epoch(s), {step} steps done")

    initial_val_loss, initial_val_acc = evaluate(fabric, model, val_loader)
    fabric.print(f"Before training | val loss: {initial_val_loss:.4f} | val acc: {initial_val_acc:.4f}")
    fabric.print(
        f"Training on {fabric.world_size} process(es), {len(train_loader)} batches of {args.batch_size} per"
        " process and epoch"
    )

    train_losses: list[float] = []
    train_acc: float | None = None
    val_loss, val_acc = initial_val_loss, initial_val_acc
    for epoch in range(start_epoch, args.epochs):
        running_loss = torch.tensor(0.0, device=fabric.device)
        n_correct = torch.tensor(0, device=fabric.device)
        n_total = torch.tensor(0, device=fabric.device)
        # Batches are already on the right device and sharded across ranks; the bar shows on rank 0 only.
        for inputs, targets in progress_bar(train_loader, fabric, desc=f"epoch {epoch + 1}"):
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, targets)
            fabric.backward(loss)
            optimizer.step()
            step += 1

            running_loss += loss.detach()
            n_correct += (outputs.argmax(dim=-1) == targets).sum()
            n_total += targets.size(0)

        # all_reduce aggregates the values across all processes
        running_loss = fabric.all_reduce(running_loss, reduce_op="mean")
        n_correct = fabric.all_reduce(n_correct, reduce_op="sum")
        n_total = fabric.all_reduce(n_total, reduce_op="sum")
        train_loss = running_loss.item() / len(train_loader)
        train_acc = n_correct.item() / n_total.item()
        train_losses.append(train_loss)
        val_loss, val_acc = evaluate(fabric, model, val_loader)
        fabric.print(
            f"Epoch {epoch + 1}/{args.epochs} | loss: {train_loss:.4f} | acc: {train_acc:.4f}"
            f" | val loss: {val_loss:.4f} | val acc: {val_acc:.4f}"
        )

        if args.checkpoint_dir is not None:
            # "epoch" counts the epochs done, so a resumed run starts right after this one.
            path = checkpoint_path(args.checkpoint_dir, epoch + 1)
            save_checkpoint(fabric, model, optimizer, epoch + 1, step, path)  # every rank calls it
            fabric.print(f"Saved {path}")

    result = {
        "start_epoch": start_epoch,
        "epochs": args.epochs,
        "steps": step,
        "train_losses": train_losses,
        "loss": train_losses[-1] if train_losses else None,
        "accuracy": train_acc,
        "initial_val_loss": initial_val_loss,
        "initial_val_accuracy": initial_val_acc,
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "world_size": fabric.world_size,
    }
    fabric.print("FINAL " + json.dumps(result))


if __name__ == "__main__":
    main(parse_args())
