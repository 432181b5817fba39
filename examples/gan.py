"""A GAN with two models and two optimizers: the article's custom-loop example, on 2-D toy data.

The "real images" are points from a Gaussian centred away from the origin. A tiny generator learns
to turn noise into such points while a tiny discriminator learns to tell the two apart. Both
models and both optimizers go through ``fabric.setup``; the loop alternates between them exactly
as in plain PyTorch. Choose the precision with ``--precision`` (``bf16-mixed`` works on the CPU).

Run it either way::

    python examples/gan.py --precision bf16-mixed
    handloom run --accelerator cpu --devices 2 --strategy ddp --precision bf16-mixed examples/gan.py

The last line printed is machine readable: ``FINAL {"initial_mean_distance": ..., ...}``.
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
STANDALONE_DEFAULTS = {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "precision": "32-true"}
REAL_MEAN = (2.0, -1.0)
REAL_STD = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--latent-dim", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--num-samples", type=int, default=2048)
    fabric_group = parser.add_argument_group("Fabric (under `handloom run`, the launcher's flags apply)")
    fabric_group.add_argument("--accelerator", default=None, help="default: cpu")
    fabric_group.add_argument("--devices", type=int, default=None, help="default: 2")
    fabric_group.add_argument("--strategy", default=None, help="default: ddp")
    fabric_group.add_argument("--precision", default=None, help="default: 32-true; try bf16-mixed")
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


class Generator(nn.Module):
    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, 32), nn.LeakyReLU(0.2), nn.Linear(32, 2))

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.net(noise)


class Discriminator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.net(points)  # a logit: BCEWithLogitsLoss below is safe under autocast


def make_dataset(num_samples: int, seed: int) -> TensorDataset:
    """Real points, with dummy labels so batches unpack as ``real_images, _`` like an image dataset."""
    generator = torch.Generator().manual_seed(seed)
    points = torch.tensor(REAL_MEAN) + REAL_STD * torch.randn(num_samples, 2, generator=generator)
    return TensorDataset(points, torch.zeros(num_samples))


@torch.no_grad()
def sample_stats(
    fabric: Fabric, generator: nn.Module, latent_dim: int, num_samples: int = 1024
) -> tuple[float, float]:
    """Distance from the generated mean to the real mean, and the generated points' std."""
    noise = torch.randn(num_samples, latent_dim, device=fabric.device)
    points = generator(noise).float()
    distance = torch.linalg.vector_norm(points.mean(dim=0) - torch.tensor(REAL_MEAN, device=fabric.device))
    return distance.item(), points.std(dim=0).mean().item()


def compute_dtype(fabric: Fabric) -> torch.dtype:
    """The dtype matrix products run in under this precision (bfloat16 with ``bf16-mixed``)."""
    with fabric.autocast():
        probe = torch.ones(2, 2, device=fabric.device)
        return (probe @ probe).dtype


def main(args: argparse.Namespace) -> None:
    fabric = build_fabric(args)
    fabric.launch()
    fabric.seed_everything(args.seed)
    latent_dim = args.latent_dim

    generator = Generator(latent_dim)
    discriminator = Discriminator()
    g_optimizer = torch.optim.Adam(generator.parameters(), lr=args.lr, betas=(0.5, 0.999))
    d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=args.lr, betas=(0.5, 0.999))

    # Set up both models and both optimizers
    generator, g_optimizer = fabric.setup(generator, g_optimizer)
    discriminator, d_optimizer = fabric.setup(discriminator, d_optimizer)
    train_loader = DataLoader(
        make_dataset(args.num_samples, args.seed), batch_size=args.batch_size, shuffle=True
    )
    train_loader = fabric.setup_dataloaders(train_loader)
    criterion = nn.BCEWithLogitsLoss()

    initial_distance, initial_std = sample_stats(fabric, generator, latent_dim)
    fabric.print(f"Before training | generated mean is {initial_distance:.3f} away from the real mean")
    distance, std = initial_distance, initial_std
    d_epoch_loss: float | None = None
    g_epoch_loss: float | None = None
    for epoch in range(args.epochs):
        d_loss_sum = torch.tensor(0.0, device=fabric.device)
        g_loss_sum = torch.tensor(0.0, device=fabric.device)
        for real_images, _ in train_loader:
            batch_size = real_images.size(0)

            # --- Train discriminator ---
            d_optimizer.zero_grad()
            real_preds = discriminator(real_images)
            d_real_loss = criterion(real_preds, torch.ones(batch_size, 1, device=fabric.device))
            noise = torch.randn(batch_size, latent_dim, device=fabric.device)
            fake_images = generator(noise).detach()
            fake_preds = discriminator(fake_images)
            d_fake_loss = criterion(fake_preds, torch.zeros(batch_size, 1, device=fabric.device))
            d_loss = (d_real_loss + d_fake_loss) / 2
            fabric.backward(d_loss)
            d_optimizer.step()

            # --- Train generator ---
            g_optimizer.zero_grad()
            noise = torch.randn(batch_size, latent_dim, device=fabric.device)
            fake_images = generator(noise)
            fake_preds = discriminator(fake_images)
            g_loss = criterion(fake_preds, torch.ones(batch_size, 1, device=fabric.device))
            fabric.backward(g_loss)
            g_optimizer.step()

            d_loss_sum += d_loss.detach().float()
            g_loss_sum += g_loss.detach().float()

        d_mean, g_mean = fabric.all_reduce((d_loss_sum, g_loss_sum), reduce_op="mean")
        d_epoch_loss, g_epoch_loss = d_mean.item() / len(train_loader), g_mean.item() / len(train_loader)
        distance, std = sample_stats(fabric, generator, latent_dim)
        fabric.print(
            f"Epoch {epoch + 1}/{args.epochs} | d_loss: {d_epoch_loss:.4f} | g_loss: {g_epoch_loss:.4f}"
            f" | generated mean is {distance:.3f} away, std {std:.3f}"
        )

    result = {
        "initial_mean_distance": initial_distance,
        "mean_distance": distance,
        "initial_std": initial_std,
        "std": std,
        "real_std": REAL_STD,
        "d_loss": d_epoch_loss,
        "g_loss": g_epoch_loss,
        "compute_dtype": str(compute_dtype(fabric)).removeprefix("torch."),
        "world_size": fabric.world_size,
    }
    fabric.print("FINAL " + json.dumps(result))


if __name__ == "__main__":
    main(parse_args())
