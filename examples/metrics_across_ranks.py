"""Metrics across ranks: ``fabric.all_reduce`` for global totals, ``fabric.all_gather`` for per-rank values.

Each process sees only its shard of the data, so its running loss and accuracy describe that
shard alone. The article's pattern adds them up across processes with ``fabric.all_reduce``.
``fabric.all_gather`` instead brings every rank's values to every rank: here the per-rank sample
counts and losses, the indices each rank trained on (which together cover the dataset exactly
once) and the indices each rank got wrong (a different number on each rank).

Run it either way::

    python examples/metrics_across_ranks.py
    handloom run --accelerator cpu --devices 2 --strategy ddp examples/metrics_across_ranks.py

The last line printed is machine readable: ``FINAL {"n_total": ..., ...}``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from handloom import Fabric

# Used when the script launches itself; under `handloom run` the launcher's flags decide instead.
STANDALONE_DEFAULTS = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=1000)
    fabric_group = parser.add_argument_group("Fabric (under `handloom run`, the launcher's flags apply)")
    fabric_group.add_argument("--accelerator", default=None, help="default: cpu")
    fabric_group.add_argument("--devices", type=int, default=None, help="default: 2")
    fabric_group.add_argument("--strategy", default=None, help="default: ddp")
    fabric_group.add_argument("--precision", default=None, help="default: 32-true")
    return parser.parse_args(argv)


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


def make_dataset(
    num_samples: int, num_classes: int = 3, num_features: int = 10, seed: int = 0
) -> TensorDataset:
    """Overlapping Gaussian clusters, plus each sample's index so ranks can report which samples they saw."""
    generator = torch.Generator().manual_seed(seed)
    centers = 1.5 * torch.randn(num_classes, num_features, generator=generator)
    targets = torch.randint(num_classes, (num_samples,), generator=generator)
    inputs = centers[targets] + torch.randn(num_samples, num_features, generator=generator)
    return TensorDataset(inputs, targets, torch.arange(num_samples))


def flatten_gathered(gathered: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Join what all_gather returned: a stacked tensor, or a list when the ranks' shapes differ."""
    return torch.cat([part.reshape(-1) for part in gathered])


def main(args: argparse.Namespace) -> None:
    fabric = build_fabric(args)
    fabric.launch()
    fabric.seed_everything(args.seed)

    dataset = make_dataset(args.num_samples, seed=args.seed)
    train_loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    train_loader = fabric.setup_dataloaders(train_loader)
    criterion = nn.CrossEntropyLoss()

    epoch_losses: list[float] = []
    for epoch in range(args.epochs):
        running_loss = torch.tensor(0.0, device=fabric.device)
        n_correct = torch.tensor(0, device=fabric.device)
        n_total = torch.tensor(0, device=fabric.device)
        seen: list[torch.Tensor] = []
        wrong: list[torch.Tensor] = []
        for batch in train_loader:
            inputs, targets, indices = batch
            outputs = model(inputs)
            loss = criterion(outputs, targets)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()

            running_loss += loss.detach()
            is_correct = outputs.argmax(dim=-1) == targets
            n_correct += is_correct.sum()
            n_total += targets.size(0)
            seen.append(indices)
            wrong.append(indices[~is_correct])

        # This rank's own numbers, before they are combined
        local_loss = running_loss.item() / len(train_loader)
        local_total = n_total.item()
        print(
            f"[rank {fabric.global_rank}] epoch {epoch + 1}: {local_total} samples, loss {local_loss:.4f}",
            flush=True,
        )

        # all_reduce aggregates values across all processes
        running_loss = fabric.all_reduce(running_loss, reduce_op="mean")
        n_correct = fabric.all_reduce(n_correct, reduce_op="sum")
        n_total = fabric.all_reduce(n_total, reduce_op="sum")
        epoch_loss = running_loss.item() / len(train_loader)
        epoch_acc = n_correct.item() / n_total.item()
        epoch_losses.append(epoch_loss)
        if fabric.is_global_zero:
            print(f"Epoch {epoch + 1}/{args.epochs} | Loss: {epoch_loss:.4f} | Acc: {epoch_acc:.4f}")

    # all_gather gives every rank the values of all ranks, stacked along a new first dimension
    per_rank = fabric.all_gather(
        torch.tensor([local_total, local_loss], device=fabric.device, dtype=torch.float64)
    )
    per_rank = per_rank.reshape(-1, 2)  # one row per rank (with one process no dimension is added)
    seen_everywhere = flatten_gathered(fabric.all_gather(torch.cat(seen)))
    # The ranks got different numbers of samples wrong: all_gather then returns a list of tensors
    wrong_everywhere = flatten_gathered(fabric.all_gather(torch.cat(wrong)))
    fabric.print(
        f"Samples per rank: {per_rank[:, 0].long().tolist()} | loss per rank: {per_rank[:, 1].tolist()}"
    )
    fabric.print(f"Misclassified in the last epoch: {wrong_everywhere.numel()} samples across all ranks")

    result = {
        "loss": epoch_losses[-1],
        "first_loss": epoch_losses[0],
        "accuracy": epoch_acc,
        "n_correct": n_correct.item(),
        "n_total": n_total.item(),
        "num_batches_per_rank": len(train_loader),
        "per_rank_n_total": per_rank[:, 0].long().tolist(),
        "per_rank_loss": per_rank[:, 1].tolist(),
        "num_wrong_gathered": wrong_everywhere.numel(),
        "seen_indices_cover_dataset_once": torch.equal(
            seen_everywhere.sort().values.cpu(), torch.arange(args.num_samples)
        ),
        "world_size": fabric.world_size,
    }
    fabric.print("FINAL " + json.dumps(result))


if __name__ == "__main__":
    main(parse_args())
