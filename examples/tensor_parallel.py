"""Tensor parallelism (and 2-D tensor x data parallelism) for a small transformer language model.

``ModelParallelStrategy`` builds a ``("data_parallel", "tensor_parallel")`` device mesh and calls
``parallelize`` below, which splits every attention and MLP block across the tensor-parallel
processes with PyTorch's ``parallelize_module`` (Megatron-style: column-parallel in, row-parallel
out) and shards each block over the data-parallel processes with FSDP2's ``fully_shard``. The
training loop is the usual Fabric loop. The model learns a synthetic token pattern (nothing is
downloaded).

Run it::

    python examples/tensor_parallel.py                       # 2 CPU processes, tensor parallel
    python examples/tensor_parallel.py --devices 4 --data-parallel 2 --tensor-parallel 2
    handloom run --accelerator cpu --devices 2 examples/tensor_parallel.py

The last line printed is machine readable: ``FINAL {"first_loss": ..., "last_loss": ..., ...}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.data import DataLoader, TensorDataset

from handloom import Fabric
from handloom.strategies import ModelParallelStrategy
from handloom.utilities import progress_bar


@dataclass(frozen=True)
class Config:
    vocab_size: int = 64
    dim: int = 64
    n_heads: int = 4
    n_layers: int = 2
    seq_len: int = 32


class Attention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.head_dim = config.dim // config.n_heads
        self.wq = nn.Linear(config.dim, config.dim, bias=False)
        self.wk = nn.Linear(config.dim, config.dim, bias=False)
        self.wv = nn.Linear(config.dim, config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1 heads: under tensor parallelism each process holds n_heads / tp of them.
        q, k, v = (
            w(x).view(batch, seq, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv)
        )
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, 4 * config.dim)
        self.w2 = nn.Linear(4 * config.dim, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.gelu(self.w1(x)))


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.dim)
        self.attention = Attention(config)
        self.ffn_norm = nn.LayerNorm(config.dim)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


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


def parallelize(model: Transformer, device_mesh: DeviceMesh) -> Transformer:
    """Split each block over the tensor-parallel axis, then shard it over the data-parallel axis."""
    tp_mesh = device_mesh["tensor_parallel"]
    dp_mesh = device_mesh["data_parallel"]
    plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    if tp_mesh.size() > 1:
        for block in model.layers:
            parallelize_module(block, tp_mesh, plan)
    if dp_mesh.size() > 1:
        for block in model.layers:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    return model


def make_dataset(num_samples: int, config: Config, seed: int = 0) -> TensorDataset:
    """Sequences that count up from a random start (mod vocab): the next token is predictable."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(config.vocab_size, (num_samples, 1), generator=generator)
    tokens = (starts + torch.arange(config.seq_len + 1)) % config.vocab_size
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--batch-size", type=int, default=8, help="sequences per data-parallel group and step"
    )
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-parallel", default="auto", help="size of the data-parallel axis")
    parser.add_argument("--tensor-parallel", default="auto", help="size of the tensor-parallel axis")
    parser.add_argument("--accelerator", default=None, help="default: cpu")
    parser.add_argument("--devices", type=int, default=None, help="default: 2")
    parser.add_argument("--precision", default=None)
    return parser.parse_args(argv)


def _size(value: str) -> int | str:
    return value if value == "auto" else int(value)


def build_fabric(args: argparse.Namespace) -> Fabric:
    strategy = ModelParallelStrategy(
        parallelize,
        data_parallel_size=_size(args.data_parallel),
        tensor_parallel_size=_size(args.tensor_parallel),
    )
    options: dict[str, Any] = {
        "accelerator": args.accelerator,
        "devices": args.devices,
        "precision": args.precision,
    }
    if os.environ.get("HANDLOOM_CLI_USED") != "1":
        options = {"accelerator": "cpu", "devices": 2, **{k: v for k, v in options.items() if v is not None}}
    return Fabric(strategy=strategy, **{k: v for k, v in options.items() if v is not None})


def main(args: argparse.Namespace) -> None:
    fabric = build_fabric(args)
    fabric.launch()
    fabric.seed_everything(args.seed)
    config = Config()
    dp_size, tp_size = fabric.strategy.mesh_sizes  # type: ignore[attr-defined]

    with fabric.init_module():
        model = Transformer(config)
    model = fabric.setup_module(model)  # calls parallelize(model, mesh)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=args.lr))
    dataset = make_dataset(args.steps * args.batch_size * dp_size, config, seed=args.seed)
    loader = fabric.setup_dataloaders(DataLoader(dataset, batch_size=args.batch_size, shuffle=True))

    losses: list[float] = []
    for step, (inputs, targets) in enumerate(progress_bar(loader, fabric, desc="training")):
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(fabric.all_reduce(loss.detach()).item())
        if step % 10 == 0:
            fabric.print(f"step {step:3d} | loss {losses[-1]:.4f}")

    fabric.print(
        "FINAL "
        + json.dumps(
            {
                "first_loss": losses[0],
                "last_loss": losses[-1],
                "initial_loss_bound": math.log(config.vocab_size),
                "steps": len(losses),
                "data_parallel": dp_size,
                "tensor_parallel": tp_size,
                "world_size": fabric.world_size,
            }
        )
    )


if __name__ == "__main__":
    main(parse_args())
