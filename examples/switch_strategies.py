"""Switch strategies without touching the training code: one ``train(fabric, ...)``, any strategy.

``train`` is ordinary training code that receives a Fabric object. Only the Fabric constructor
changes with ``--strategy``:

* ``single``: one process (``Fabric(devices=1)``); ``launch(train)`` simply calls ``train``.
* ``ddp``: the script is started again once per device; ``launch(train)`` runs ``train`` in each.
* ``ddp_spawn`` / ``ddp_fork``: ``launch(train)`` starts ``train`` in new processes and returns
  rank 0's result to this process.
* ``fsdp``: like ``ddp``, but each process holds only a shard of the parameters, gradients and
  optimizer state (FSDP2); the numbers are the same.

``--global-batch-size`` is split across the processes and the data is read in a fixed order
(shuffled once when it is made), so every strategy takes the same optimizer steps on the same
global batches: the final loss agrees across strategies up to floating-point rounding.

Run it either way::

    python examples/switch_strategies.py --strategy single
    python examples/switch_strategies.py --strategy ddp_spawn --devices 2
    handloom run --accelerator cpu --devices 2 --strategy ddp examples/switch_strategies.py
    handloom run --accelerator cpu --devices 2 --strategy fsdp examples/switch_strategies.py

The last line printed is machine readable: ``FINAL {"loss": ..., ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from handloom import Fabric

STRATEGIES = ("single", "ddp", "ddp_spawn", "ddp_fork", "fsdp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--global-batch-size", type=int, default=64, help="split evenly across processes")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--num-samples", type=int, default=1024)
    fabric_group = parser.add_argument_group("Fabric (under `handloom run`, the launcher's flags apply)")
    fabric_group.add_argument("--strategy", choices=STRATEGIES, default=None, help="default: ddp_spawn")
    fabric_group.add_argument("--accelerator", default=None, help="default: cpu")
    fabric_group.add_argument("--devices", type=int, default=None, help="default: 2 (1 for single)")
    fabric_group.add_argument("--precision", default=None, help="default: 32-true")
    return parser.parse_args(argv)


def build_fabric(args: argparse.Namespace) -> Fabric:
    """The only place that knows about the strategy."""
    if os.environ.get("HANDLOOM_CLI_USED") == "1":
        # `handloom run` started the processes; its flags reach Fabric(), ours only fill the gaps.
        given = {"accelerator": args.accelerator, "devices": args.devices, "precision": args.precision}
        if args.strategy is not None:
            given["strategy"] = "single_device" if args.strategy == "single" else args.strategy
        return Fabric(**{name: value for name, value in given.items() if value is not None})
    accelerator = args.accelerator or "cpu"
    precision = args.precision or "32-true"
    strategy = args.strategy or "ddp_spawn"
    if strategy == "single":
        return Fabric(accelerator=accelerator, devices=1, precision=precision)
    return Fabric(accelerator=accelerator, devices=args.devices or 2, strategy=strategy, precision=precision)


def make_dataset(num_samples: int, seed: int) -> TensorDataset:
    """A noisy linear decision boundary in 20 dimensions; the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, 20, generator=generator)
    weights = torch.randn(20, generator=generator)
    targets = ((inputs @ weights + 0.5 * torch.randn(num_samples, generator=generator)) > 0).long()
    return TensorDataset(inputs, targets)


def train(fabric: Fabric, args: argparse.Namespace) -> dict[str, Any]:
    """Plain training code: nothing in here depends on the strategy."""
    fabric.seed_everything(args.seed)
    if args.global_batch_size % fabric.world_size:
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} does not split evenly across"
            f" {fabric.world_size} processes. Pass a multiple of {fabric.world_size}."
        )
    dataset = make_dataset(args.num_samples, args.seed)
    # shuffle=False keeps the global batches identical for every strategy (see the module docstring).
    loader = DataLoader(dataset, batch_size=args.global_batch_size // fabric.world_size, shuffle=False)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(loader)

    for epoch in range(args.epochs):
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), targets)
            fabric.backward(loss)
            optimizer.step()
        fabric.print(
            f"[{fabric.strategy.name}] epoch {epoch + 1}/{args.epochs} | last batch loss: {loss.item():.4f}"
        )

    # Every rank scores the whole dataset, so the numbers do not depend on how the data was sharded.
    with torch.no_grad():
        inputs, targets = fabric.to_device(dataset.tensors)
        outputs = model(inputs)
        full_loss = nn.functional.cross_entropy(outputs, targets).item()
        accuracy = (outputs.argmax(dim=-1) == targets).float().mean().item()
    return {
        "loss": full_loss,
        "accuracy": accuracy,
        "steps_per_epoch": len(loader),
        "strategy": fabric.strategy.name,
        "world_size": fabric.world_size,
        "global_rank": fabric.global_rank,
        "pid": os.getpid(),
    }


def main(args: argparse.Namespace) -> None:
    fabric = build_fabric(args)
    # Runs train(fabric, args) in every process. With ddp_spawn/ddp_fork the new processes run it and
    # this process gets rank 0's result; with ddp the script itself runs again once per device.
    result = fabric.launch(train, args)
    result["returned_from_another_process"] = result.pop("pid") != os.getpid()
    fabric.print("FINAL " + json.dumps(result))


if __name__ == "__main__":
    main(parse_args())
