"""Data that must match across ranks, and meta-device init, on real gloo process groups (2 forked processes).

* Iterable datasets: one that shards itself by rank is not split again; ``SplitByRank`` opts in.
* Tensor parallelism alone (one data-parallel replica): every rank gets the same shuffled batches.
* FSDP meta-device init: a ``reset_parameters`` that reassigns a buffer and a sharded parameter
  (litgpt's RoPE cache) gives the values and the losses of the model built eagerly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from handloom import Fabric
from handloom.data import SplitByRank
from handloom.strategies import FSDPStrategy, ModelParallelStrategy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SIZE = 20


class RankStream(IterableDataset[int]):
    """Yields ``0..SIZE-1``; with ``shard_self``, only this rank's share, as Lightning asks of users."""

    def __init__(self, shard_self: bool) -> None:
        self.shard_self = shard_self

    def __iter__(self) -> Iterator[int]:
        if not self.shard_self:
            return iter(range(SIZE))
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return iter(range(rank, SIZE, world))


def _seen(fabric: Fabric, loader: DataLoader[Any]) -> list[int]:
    """Every element each rank's loader yields, all ranks together."""
    mine = torch.cat([batch.reshape(-1) for batch in fabric.setup_dataloaders(loader)])
    return sorted(fabric.all_gather(mine).reshape(-1).tolist())


def _iterables(fabric: Fabric) -> dict[str, list[int]]:
    return {
        "self_sharded": _seen(fabric, DataLoader(RankStream(shard_self=True), batch_size=2)),
        "plain": _seen(fabric, DataLoader(RankStream(shard_self=False), batch_size=2)),
        "split_by_rank": _seen(fabric, DataLoader(SplitByRank(RankStream(shard_self=False)), batch_size=2)),
    }


def test_iterable_datasets_are_split_only_on_request() -> None:
    result = Fabric(accelerator="cpu", devices=2, strategy="ddp_fork").launch(_iterables)
    assert result["self_sharded"] == list(range(SIZE))  # every element exactly once
    assert result["plain"] == sorted(list(range(SIZE)) * 2)  # Lightning: each rank iterates it all
    assert result["split_by_rank"] == list(range(SIZE))


def _keep(model: nn.Module, mesh: Any) -> nn.Module:
    return model


def _tensor_parallel_batches(fabric: Fabric) -> list[list[list[int]]]:
    fabric.seed_everything(11)
    loader = fabric.setup_dataloaders(
        DataLoader(TensorDataset(torch.arange(SIZE)), batch_size=4, shuffle=True)
    )
    if fabric.global_rank == 1:
        torch.rand(1)  # this rank's global RNG moves on; its batches must not
    epochs = [torch.cat([batch for (batch,) in loader]) for _ in range(2)]
    return [[t.tolist() for t in fabric.all_gather(order)] for order in epochs]


def test_tensor_parallel_ranks_get_the_same_shuffled_batches() -> None:
    strategy = ModelParallelStrategy(_keep, data_parallel_size=1, tensor_parallel_size=2, start_method="fork")
    epoch0, epoch1 = Fabric(accelerator="cpu", devices=2, strategy=strategy).launch(_tensor_parallel_batches)
    assert epoch0[0] == epoch0[1] and epoch1[0] == epoch1[1]  # rank 0 and rank 1 agree
    assert sorted(epoch0[0]) == list(range(SIZE)) and epoch0[0] != list(range(SIZE))
    assert epoch0[0] != epoch1[0]  # and the shuffle follows the epoch


VOCAB, DIM, SEQ, BATCH = 12, 16, 6, 4


def _rope(device: torch.device | None = None) -> torch.Tensor:
    positions = torch.arange(SEQ, device=device, dtype=torch.float32)[:, None]
    return torch.cos(positions * torch.linspace(0.1, 1.0, DIM, device=device))


class RopeGPT(nn.Module):
    """litgpt's pattern: the root's ``reset_parameters`` builds new tensors and assigns them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB)
        self.scale = nn.Parameter(torch.empty(DIM))
        self.register_buffer("cos", torch.empty(SEQ, DIM), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.cos = _rope(self.cos.device)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, DIM, device=self.scale.device))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(idx) * self.cos[: idx.shape[1]]
        return self.head(torch.tanh(self.proj(hidden)) * self.scale)


class Regrows(nn.Module):
    """Its ``reset_parameters`` gives a parameter that will be sharded another shape."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(4, 2))

    def reset_parameters(self) -> None:
        self.weight = nn.Parameter(torch.zeros(6, 2, device=self.weight.device))


def _tokens() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [
        (
            torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen),
            torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen),
        )
        for _ in range(3)
    ]


def _loss(model: Any, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(idx).flatten(0, 1), targets.flatten())


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def _meta_init_and_train(fabric: Fabric) -> dict[str, Any]:
    with fabric.init_module(empty_init=True):
        model = RopeGPT()
    torch.manual_seed(0)  # building on meta drew nothing; materialising draws as RopeGPT() would
    model = fabric.setup(model)
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.5))
    rope_ok = torch.tensor(float(torch.equal(model.cos, _rope())))
    init = {name: _full(p) for name, p in model.module.named_parameters()}
    losses = []
    rank, world = fabric.global_rank, fabric.world_size
    for idx, targets in _tokens():
        loss = _loss(model, idx.chunk(world)[rank], targets.chunk(world)[rank])
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(fabric.all_reduce(loss.detach()).item())
    with fabric.init_module(empty_init=True):
        regrows = Regrows()
    try:
        fabric.setup_module(regrows)
        regrow_error = ""
    except ValueError as error:
        regrow_error = str(error)
    return {
        "regrow_error": regrow_error,
        "rope_ok": fabric.all_gather(rope_ok).tolist(),
        "scale_sharded": isinstance(model.scale, DTensor),
        "init": init,
        "losses": losses,
    }


def test_meta_init_keeps_tensors_that_reset_parameters_assigns() -> None:
    strategy = FSDPStrategy(auto_wrap_policy={nn.Linear})
    strategy.start_method = "fork"
    result = Fabric(accelerator="cpu", devices=2, strategy=strategy).launch(_meta_init_and_train)
    torch.manual_seed(0)
    eager = RopeGPT()
    assert result["rope_ok"] == [1.0, 1.0]  # the rebuilt buffer, on every rank
    assert result["scale_sharded"]
    regrown = "Regrows.reset_parameters() replaced the sharded tensor 'weight' of shape (4, 2) with one"
    assert f"{regrown} of shape (6, 2)" in result["regrow_error"]
    for name, param in eager.named_parameters():
        torch.testing.assert_close(result["init"][name], param.detach(), msg=name)
    optimizer = torch.optim.SGD(eager.parameters(), lr=0.5)
    expected = []
    for idx, targets in _tokens():
        loss = _loss(eager, idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        expected.append(loss.item())
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    torch.testing.assert_close(result["losses"], expected, rtol=1e-5, atol=1e-5)
