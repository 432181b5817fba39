"""Train a small convolutional network on synthetic images with DDP on several CPU processes.

Each 1x16x16 image shows one of four patterns (horizontal stripes, vertical stripes, diagonal
stripes, a bright square), at a random offset and under Gaussian noise, so nothing is downloaded
and the task still needs the convolutions to look at shapes. The loop is plain PyTorch; Fabric
launches the processes, wraps the model in DistributedDataParallel, shards the training and
validation data and adds up the validation accuracy over all ranks.

Run it either way::

    python examples/image_classifier.py --epochs 3
    handloom run --accelerator cpu --devices 2 --strategy ddp examples/image_classifier.py --epochs 3

The last line printed is machine readable: ``FINAL {"val_accuracy": ..., ...}``.
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
from handloom.utilities import progress_bar

# Used when the script launches itself; under `handloom run` the launcher's flags decide instead.
STANDALONE_DEFAULTS = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}
IMAGE_SIZE = 16
NUM_CLASSES = 4
CLASS_NAMES = ("horizontal", "vertical", "diagonal", "square")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="images per process and step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-train", type=int, default=2048, help="synthetic training images")
    parser.add_argument("--num-val", type=int, default=512, help="synthetic validation images")
    parser.add_argument("--noise", type=float, default=0.8, help="standard deviation of the pixel noise")
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


def make_images(num_images: int, noise: float, seed: int) -> TensorDataset:
    """Noisy images of four class-dependent patterns; the same on every rank for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(NUM_CLASSES, (num_images,), generator=generator)
    offsets = torch.randint(4, (num_images, 2), generator=generator)
    rows = torch.arange(IMAGE_SIZE).view(1, -1, 1)
    cols = torch.arange(IMAGE_SIZE).view(1, 1, -1)
    dy, dx = offsets[:, 0].view(-1, 1, 1), offsets[:, 1].view(-1, 1, 1)
    patterns = torch.stack(
        [
            ((rows + dy) // 2 % 2).expand(-1, -1, IMAGE_SIZE),  # horizontal stripes, 2 pixels wide
            ((cols + dx) // 2 % 2).expand(-1, IMAGE_SIZE, -1),  # vertical stripes
            ((rows + cols + dy) // 2 % 2),  # diagonal stripes
            ((rows - 4 - dy).abs() < 3) & ((cols - 4 - dx).abs() < 3),  # a 5x5 square somewhere
        ],
        dim=1,
    ).float()
    images = patterns[torch.arange(num_images), targets]
    images = images + noise * torch.randn(images.shape, generator=generator)
    return TensorDataset(images.unsqueeze(1), targets)


class ConvNet(nn.Module):
    """Two convolution + pooling stages and a linear classifier (about 10k parameters)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16x16 -> 8x8
            nn.Conv2d(8, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, num_classes)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


@torch.no_grad()
def evaluate(fabric: Fabric, model: nn.Module, loader: DataLoader[Any]) -> tuple[float, float]:
    """Mean loss and accuracy over the validation images of all ranks."""
    model.eval()
    loss_sum = torch.tensor(0.0, device=fabric.device)
    n_correct = torch.tensor(0, device=fabric.device)
    n_total = torch.tensor(0, device=fabric.device)
    for images, targets in loader:
        logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum")
        n_correct += (logits.argmax(dim=-1) == targets).sum()
        n_total += targets.numel()
    model.train()
    loss_sum, n_correct, n_total = fabric.all_reduce((loss_sum, n_correct, n_total), reduce_op="sum")
    return loss_sum.item() / n_total.item(), n_correct.item() / n_total.item()


def main(args: argparse.Namespace) -> None:
    fabric = build_fabric(args)
    fabric.launch()  # with strategy="ddp" this re-runs the script once per device; the rest runs there
    fabric.seed_everything(args.seed)

    train_set = make_images(args.num_train, args.noise, seed=args.seed)
    val_set = make_images(args.num_val, args.noise, seed=args.seed + 1)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=args.batch_size)

    model = ConvNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model, optimizer = fabric.setup(model, optimizer)
    train_loader, val_loader = fabric.setup_dataloaders(train_loader, val_loader)
    num_params = sum(p.numel() for p in model.parameters())

    initial_val_loss, initial_val_acc = evaluate(fabric, model, val_loader)
    fabric.print(
        f"ConvNet with {num_params} parameters on {fabric.world_size} process(es), {len(train_loader)}"
        f" batches of {args.batch_size} per process and epoch | val acc before training:"
        f" {initial_val_acc:.3f}"
    )

    train_losses: list[float] = []
    val_loss, val_acc = initial_val_loss, initial_val_acc
    for epoch in range(args.epochs):
        loss_sum = torch.tensor(0.0, device=fabric.device)
        for images, targets in progress_bar(train_loader, fabric, desc=f"epoch {epoch + 1}"):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(images), targets)
            fabric.backward(loss)
            optimizer.step()
            loss_sum += loss.detach()
        train_losses.append(fabric.all_reduce(loss_sum, reduce_op="mean").item() / len(train_loader))
        val_loss, val_acc = evaluate(fabric, model, val_loader)
        fabric.print(
            f"Epoch {epoch + 1}/{args.epochs} | train loss: {train_losses[-1]:.4f}"
            f" | val loss: {val_loss:.4f} | val acc: {val_acc:.4f}"
        )

    result = {
        "train_losses": train_losses,
        "initial_val_loss": initial_val_loss,
        "initial_val_accuracy": initial_val_acc,
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "num_val": args.num_val,
        "num_classes": NUM_CLASSES,
        "num_params": num_params,
        "world_size": fabric.world_size,
    }
    fabric.print("FINAL " + json.dumps(result))


if __name__ == "__main__":
    main(parse_args())
