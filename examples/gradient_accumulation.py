"""Gradient accumulation and clipping with Fabric, as in the article's snippet.

Each process runs ``--accumulation-steps`` forward/backward passes on small micro-batches before
one optimizer step. ``fabric.no_backward_sync(model, enabled=is_accumulating)`` skips DDP's
gradient all-reduce on the micro-steps that only accumulate, so processes talk once per optimizer
step. ``fabric.clip_gradients`` clips the summed gradient to ``--max-grad-norm`` and returns its
norm before clipping. The task is a synthetic regression (a random "teacher" network plus noise).

Run it either way::

    python examples/gradient_accumulation.py
    handloom run --accelerator cpu --devices 2 --strategy ddp examples/gradient_accumulation.py

The last line printed is machine readable: ``FINAL {"loss": ..., ...}``.
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
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16, help="micro-batch size per process")
    parser.add_argument("--accumulation-steps", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--num-samples", type=int, default=1024)
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


def make_dataset(num_samples: int, num_features: int = 8, seed: int = 0) -> TensorDataset:
    """Targets from a fixed random teacher network plus noise; the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, num_features, generator=generator)
    w1 = torch.randn(num_features, 16, generator=generator)
    w2 = torch.randn(16, 1, generator=generator) / 4
    targets = torch.tanh(inputs @ w1) @ w2 + 0.05 * torch.randn(num_samples, 1, generator=generator)
    return TensorDataset(inputs, targets)


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def main(args: argparse.Namespace) -> None:
    fabric = build_fabric(args)
    fabric.launch()
    fabric.seed_everything(args.seed)

    dataset = make_dataset(args.num_samples, seed=args.seed)
    train_loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model, optimizer = fabric.setup(model, optimizer)
    train_loader = fabric.setup_dataloaders(train_loader)
    criterion = nn.MSELoss()

    # effective batch = batch_size * accumulation_steps * world_size
    accumulation_steps = args.accumulation_steps
    max_grad_norm = args.max_grad_norm
    fabric.print(
        f"{fabric.world_size} process(es) x {accumulation_steps} micro-batches of {args.batch_size}"
        f" = {args.batch_size * accumulation_steps * fabric.world_size} samples per optimizer step"
    )

    epoch_losses: list[float] = []
    grad_norms: list[float] = []
    num_clipped = 0
    sync_check: dict[str, bool] = {}
    for epoch in range(args.epochs):
        optimizer.zero_grad()
        epoch_loss = torch.tensor(0.0, device=fabric.device)
        for step, batch in enumerate(train_loader):
            inputs, targets = batch
            is_accumulating = (step + 1) % accumulation_steps != 0

            # no_backward_sync skips the gradient all-reduce until the last accumulation step
            with fabric.no_backward_sync(model, enabled=is_accumulating):
                outputs = model(inputs)
                loss = criterion(outputs, targets) / accumulation_steps
                fabric.backward(loss)
            epoch_loss += loss.detach()

            if epoch == 0 and step in (0, accumulation_steps - 1):
                # Compare this rank's gradients with the others': apart while accumulating, equal once synced.
                gathered = fabric.all_gather(flat_grads(model)).reshape(fabric.world_size, -1)
                key = "grads_equal_while_accumulating" if is_accumulating else "grads_equal_after_sync"
                sync_check[key] = bool(torch.allclose(gathered[0], gathered[-1]))

            if not is_accumulating:
                # Gradient clipping: Fabric unscales fp16 gradients first
                grad_norm = fabric.clip_gradients(model, optimizer, max_norm=max_grad_norm)
                assert grad_norm is not None  # clipping by max_norm returns the norm before clipping
                optimizer.step()
                optimizer.zero_grad()
                grad_norms.append(grad_norm.item())
                num_clipped += int(grad_norm.item() > max_grad_norm)

        # The loss was divided by accumulation_steps, so the sum is the mean per optimizer step.
        num_optimizer_steps = len(train_loader) // accumulation_steps
        mean_loss = fabric.all_reduce(epoch_loss, reduce_op="mean").item() / num_optimizer_steps
        epoch_losses.append(mean_loss)
        fabric.print(
            f"Epoch {epoch + 1}/{args.epochs} | loss: {mean_loss:.4f} | grad norm before clipping:"
            f" {grad_norms[-1]:.4f} (clipped {num_clipped}/{len(grad_norms)} steps so far)"
        )

    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered_params = fabric.all_gather(params).reshape(fabric.world_size, -1)
    result = {
        "first_loss": epoch_losses[0],
        "loss": epoch_losses[-1],
        "optimizer_steps": len(grad_norms),
        "micro_batches_per_epoch": len(train_loader),
        "grad_norm": grad_norms[-1],
        "max_grad_norm_seen": max(grad_norms),
        "clipped_steps": num_clipped,
        **sync_check,
        "params_equal_across_ranks": bool(torch.equal(gathered_params[0], gathered_params[-1])),
        "world_size": fabric.world_size,
    }
    fabric.print("FINAL " + json.dumps(result))


if __name__ == "__main__":
    main(parse_args())
