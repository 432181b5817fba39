"""K-fold cross-validation with one Fabric: a fresh model per fold, data split by samplers.

The dataset (Gaussian clusters, synthetic) is cut into ``--folds`` parts. For each fold a new
model and optimizer go through ``fabric.setup``; the training loader draws from the other folds
with a ``SubsetRandomSampler`` (Fabric shards that sampler across processes) and the validation
loader reads the held-out fold through a ``Subset``. The fold's validation accuracy counts the
predictions of all processes (``fabric.all_reduce`` of correct and total counts), and the folds'
accuracies are averaged at the end. The processes are launched once and the same Fabric serves
every fold.

Run it either way::

    python examples/kfold.py --folds 5
    handloom run --accelerator cpu --devices 2 --strategy ddp examples/kfold.py --folds 5

The last line printed is machine readable: ``FINAL {"fold_accuracies": [...], "mean_accuracy": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, SubsetRandomSampler, TensorDataset

from handloom import Fabric

# Used when the script launches itself; under `handloom run` the launcher's flags decide instead.
STANDALONE_DEFAULTS = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fold")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per process and step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-classes", type=int, default=4)
    fabric_group = parser.add_argument_group("Fabric (under `handloom run`, the launcher's flags apply)")
    fabric_group.add_argument("--accelerator", default=None, help="default: cpu")
    fabric_group.add_argument("--devices", type=int, default=None, help="default: 2")
    fabric_group.add_argument("--strategy", default=None, help="default: ddp")
    fabric_group.add_argument("--precision", default=None, help="default: 32-true")
    args = parser.parse_args(argv)
    if args.folds < 2:
        parser.error(f"--folds {args.folds} leaves nothing to validate on; pass --folds 2 or more.")
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
    """Gaussian clusters, one per class, plus each sample's index (to check how the folds were read)."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, num_features, generator=generator)
    targets = torch.randint(num_classes, (num_samples,), generator=generator)
    inputs = centers[targets] + torch.randn(num_samples, num_features, generator=generator)
    return TensorDataset(inputs, targets, torch.arange(num_samples))


def split_folds(num_samples: int, num_folds: int, seed: int) -> list[list[int]]:
    """Shuffle the indices once (the same on every rank) and cut them into ``num_folds`` parts."""
    permutation = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return [fold.tolist() for fold in permutation.chunk(num_folds)]


def build_model(num_features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(num_features, 64), nn.ReLU(), nn.Linear(64, num_classes))


@torch.no_grad()
def validate(fabric: Fabric, model: nn.Module, loader: DataLoader[Any]) -> float:
    """Accuracy over the held-out fold, counting the predictions of every process once."""
    model.eval()
    n_correct = torch.tensor(0, device=fabric.device)
    n_total = torch.tensor(0, device=fabric.device)
    for inputs, targets, _ in loader:
        n_correct += (model(inputs).argmax(dim=-1) == targets).sum()
        n_total += targets.numel()
    model.train()
    n_correct, n_total = fabric.all_reduce((n_correct, n_total), reduce_op="sum")
    return float(n_correct.item() / n_total.item())


def main(args: argparse.Namespace) -> None:
    fabric = build_fabric(args)
    fabric.launch()
    fabric.seed_everything(args.seed)

    dataset = make_dataset(args.num_samples, args.num_classes, seed=args.seed)
    folds = split_folds(len(dataset), args.folds, seed=args.seed)
    num_features = dataset.tensors[0].shape[1]

    fold_accuracies: list[float] = []
    folds_read_once: list[bool] = []
    for fold, val_ids in enumerate(folds):
        train_ids = [i for other, ids in enumerate(folds) if other != fold for i in ids]
        train_loader = DataLoader(dataset, batch_size=args.batch_size, sampler=SubsetRandomSampler(train_ids))
        val_loader = DataLoader(Subset(dataset, val_ids), batch_size=args.batch_size)
        train_loader, val_loader = fabric.setup_dataloaders(train_loader, val_loader)

        # A fresh model and optimizer for every fold: nothing learned on one fold leaks into another.
        model = build_model(num_features, args.num_classes)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        model, optimizer = fabric.setup(model, optimizer)

        for epoch in range(args.epochs):
            seen: list[torch.Tensor] = []
            for inputs, targets, indices in train_loader:
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(inputs), targets)
                fabric.backward(loss)
                optimizer.step()
                seen.append(indices)
            if epoch == 0:
                # Together the processes read each training sample of the fold exactly once per epoch.
                gathered = fabric.all_gather(torch.cat(seen))
                # A list when the ranks read different numbers of samples, else one stacked tensor.
                parts = gathered if isinstance(gathered, list) else [gathered]
                everything = torch.cat([part.flatten() for part in parts])
                folds_read_once.append(sorted(everything.tolist()) == sorted(train_ids))

        accuracy = validate(fabric, model, val_loader)
        fold_accuracies.append(accuracy)
        fabric.print(
            f"Fold {fold + 1}/{args.folds} | train {len(train_ids)} samples, validate {len(val_ids)}"
            f" | val acc: {accuracy:.4f}"
        )

    mean_accuracy = sum(fold_accuracies) / len(fold_accuracies)
    fabric.print(f"Mean validation accuracy over {args.folds} folds: {mean_accuracy:.4f}")
    result = {
        "fold_accuracies": fold_accuracies,
        "mean_accuracy": mean_accuracy,
        "folds_read_once": folds_read_once,
        "num_samples": args.num_samples,
        "num_classes": args.num_classes,
        "world_size": fabric.world_size,
    }
    fabric.print("FINAL " + json.dumps(result))


if __name__ == "__main__":
    main(parse_args())
