"""Train a small decoder-only transformer with FSDP2 on several CPU processes, then save it sharded.

``FSDPStrategy(auto_wrap_policy={Block}, activation_checkpointing_policy={Block})`` makes every
transformer block its own FSDP unit (its parameters are gathered for its forward and backward
and freed after) and recomputes the block's activations in the backward pass instead of keeping
them. The model is created under ``fabric.init_module(empty_init=True)``: on the meta device, so
no process ever holds a full, initialised copy; ``fabric.setup`` allocates and initialises only
each rank's shard. The language-modelling task is synthetic (nothing is downloaded): arithmetic
sequences with a random start and a random step, so predicting the next token needs attention to
the two previous ones.

At the end every rank calls ``fabric.save``: under FSDP each writes its own shards into one
``torch.distributed.checkpoint`` directory, which loads on any number of processes, or in one
process with ``Fabric(devices=1).load(path)``.

Run it::

    python examples/language_model.py                          # 2 CPU processes
    python examples/language_model.py --steps 100 --checkpoint-dir checkpoints
    handloom run --accelerator cpu --devices 2 examples/language_model.py

The last line printed is machine readable: ``FINAL {"first_loss": ..., "checkpoint": ..., ...}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from handloom import Fabric
from handloom.strategies import FSDPStrategy
from handloom.utilities import progress_bar


@dataclass(frozen=True)
class Config:
    vocab_size: int = 64
    dim: int = 64
    n_heads: int = 4
    n_layers: int = 2
    seq_len: int = 32
    max_step: int = 4  # sequences go up by 1..max_step tokens at a time


class Attention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.proj = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = (
            t.view(batch, seq, self.n_heads, dim // self.n_heads).transpose(1, 2)
            for t in self.qkv(x).chunk(3, dim=-1)
        )
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, dim))


class Block(nn.Module):
    """Pre-norm transformer block: the unit FSDP shards and activation checkpointing recomputes."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.dim)
        self.attention = Attention(config)
        self.mlp_norm = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, 4 * config.dim), nn.GELU(), nn.Linear(4 * config.dim, config.dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embeddings = nn.Embedding(config.seq_len, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.dim)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_embeddings(tokens) + self.pos_embeddings(positions)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))


def make_dataset(num_samples: int, config: Config, seed: int = 0) -> TensorDataset:
    """Arithmetic sequences (mod vocab) with a random start and step; inputs and next-token targets."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(config.vocab_size, (num_samples, 1), generator=generator)
    steps = torch.randint(1, config.max_step + 1, (num_samples, 1), generator=generator)
    tokens = (starts + steps * torch.arange(config.seq_len + 1)) % config.vocab_size
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per process and step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="where the sharded checkpoint goes (default: a new temporary directory)",
    )
    fabric_group = parser.add_argument_group("Fabric (under `handloom run`, the launcher's flags apply)")
    fabric_group.add_argument("--accelerator", default=None, help="default: cpu")
    fabric_group.add_argument("--devices", type=int, default=None, help="default: 2")
    fabric_group.add_argument("--precision", default=None, help="default: 32-true")
    return parser.parse_args(argv)


def build_fabric(args: argparse.Namespace) -> Fabric:
    """FSDP with one unit per block; ``handloom run`` supplies the accelerator and devices left out."""
    strategy = FSDPStrategy(auto_wrap_policy={Block}, activation_checkpointing_policy={Block})
    options: dict[str, Any] = {
        "accelerator": args.accelerator,
        "devices": args.devices,
        "precision": args.precision,
    }
    if os.environ.get("HANDLOOM_CLI_USED") != "1":
        options = {"accelerator": "cpu", "devices": 2, **{k: v for k, v in options.items() if v is not None}}
    return Fabric(strategy=strategy, **{k: v for k, v in options.items() if v is not None})


def checkpoint_dir(fabric: Fabric, requested: Path | None) -> Path:
    """``requested``, or one temporary directory that rank 0 creates and shares with the others."""
    if requested is not None:
        return requested
    created = tempfile.mkdtemp(prefix="language_model_") if fabric.is_global_zero else None
    return Path(fabric.broadcast(created))


def main(args: argparse.Namespace) -> None:
    fabric = build_fabric(args)
    fabric.launch()
    fabric.seed_everything(args.seed)
    config = Config()

    with fabric.init_module(empty_init=True):  # meta device: parameters are allocated per shard in setup
        model = Transformer(config)
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model, optimizer = fabric.setup(model, optimizer)  # shards each Block, then the root
    local_params = sum(p.to_local().numel() for p in model.parameters())  # FSDP2 parameters are DTensors

    dataset = make_dataset(args.steps * args.batch_size * fabric.world_size, config, seed=args.seed)
    loader = fabric.setup_dataloaders(DataLoader(dataset, batch_size=args.batch_size, shuffle=True))
    fabric.print(
        f"{num_params} parameters, {local_params} of them on rank 0 | {fabric.world_size} process(es),"
        f" {len(loader)} steps of {args.batch_size} sequences per process"
    )

    losses: list[float] = []
    for step, (inputs, targets) in enumerate(progress_bar(loader, fabric, desc="training")):
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(fabric.all_reduce(loss.detach(), reduce_op="mean").item())
        if step % 10 == 0 or step == len(loader) - 1:
            fabric.print(f"step {step:3d} | loss {losses[-1]:.4f}")

    # Under FSDP every rank calls save: each writes its own shards into the same directory.
    path = checkpoint_dir(fabric, args.checkpoint_dir) / f"step{len(losses):05d}"
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": len(losses), "config": vars(config)})
    fabric.print(f"Saved a sharded checkpoint to {path}")

    result = {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "initial_loss_bound": math.log(config.vocab_size),
        "steps": len(losses),
        "num_params": num_params,
        "local_params": local_params,
        "checkpoint": str(path),
        "world_size": fabric.world_size,
    }
    fabric.print("FINAL " + json.dumps(result))


if __name__ == "__main__":
    main(parse_args())
