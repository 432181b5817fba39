"""The set-up model under DDP and FSDP on real gloo process groups (2 forked processes per job).

What users rely on: a method other than ``forward`` either synchronises its gradients (marked)
or fails loudly (unmarked); hooks on the set-up model fire; a full state dict loads into a
sharded model.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from handloom import Fabric
from handloom.strategies import FSDPStrategy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # identical initial weights on every rank
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)
        self.lr = 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self(x), y)

    def head_only(self, h: torch.Tensor) -> torch.Tensor:  # runs a submodule, not forward
        return self.head(h)

    def configure_optimizer(self) -> torch.optim.Optimizer:  # runs no module at all
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(6, 4, generator=gen), torch.randint(0, 2, (6,), generator=gen)


def _expect_unmarked_error(call: Any, name: str) -> str:
    with pytest.raises(RuntimeError, match=rf"mark_forward_method\('{name}'\)") as raised:
        call()
    return str(raised.value)


def _ddp_checks(fabric: Fabric) -> dict[str, Any]:
    rank = fabric.global_rank
    reference = _Net()
    model = fabric.setup(_Net())
    x, y = _rank_batch(rank)

    # Unmarked methods that run the model (or a submodule) bypass DDP: they raise.
    message = _expect_unmarked_error(lambda: model.compute_loss(x, y), "compute_loss")
    _expect_unmarked_error(lambda: model.head_only(torch.ones(1, 8)), "head_only")
    # Methods and attributes that do not run the model work as they are.
    optimizer = fabric.setup_optimizers(model.configure_optimizer())
    assert model.lr == 0.1

    # Marked: the gradients are averaged across ranks, as for forward.
    model.mark_forward_method("compute_loss")
    fabric.backward(model.compute_loss(x, y))
    reference.compute_loss(x, y).backward()
    for synced, local in zip(model.parameters(), reference.parameters(), strict=True):
        assert local.grad is not None
        expected = fabric.all_gather(local.grad).mean(dim=0)
        torch.testing.assert_close(synced.grad, expected, rtol=1e-6, atol=1e-7)
    optimizer.step()
    optimizer.zero_grad()

    # Hooks registered on the set-up model fire, and a forward hook may replace the output.
    seen: list[str] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(f"pre:{module is model}"))
    handle = model.register_forward_hook(lambda module, args, output: output * 0)
    model.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append("backward"))
    out = model(x)
    assert torch.count_nonzero(out) == 0
    fabric.backward((out + 1).sum())
    handle.remove()
    assert torch.count_nonzero(model(x)) > 0
    assert seen == ["pre:True", "backward", "pre:True"]
    return {"rank": rank, "message": message}


def test_ddp_marked_methods_sync_unmarked_ones_raise_and_hooks_fire() -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_fork")
    result = fabric.launch(_ddp_checks)
    assert result["rank"] == 0
    expected = "model.compute_loss() ran _Net.forward outside the 'ddp_fork' strategy's wrapper"
    assert expected in result["message"]


def _fsdp_checks(fabric: Fabric) -> dict[str, Any]:
    plain = _Net()
    with torch.no_grad():
        for param in plain.parameters():
            param.add_(1.0)  # different from what setup starts with
    full = plain.state_dict()
    model = fabric.setup(_Net())
    shards = {key: value.detach().clone() for key, value in model.state_dict().items()}
    assert all(isinstance(value, DTensor) for value in shards.values())

    # A full (plain-tensor) state dict is distributed onto the shards.
    result = model.load_state_dict(full)
    assert not result.missing_keys and not result.unexpected_keys
    for name, param in model.module.named_parameters():
        assert isinstance(param, DTensor)
        torch.testing.assert_close(param.full_tensor(), full[name])
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-2, atol=1e-2)  # fp16 compute
    # Strict as before: a missing key raises, strict=False reports it.
    partial = {key: value for key, value in full.items() if key != "head.bias"}
    with pytest.raises(RuntimeError, match=r"head\.bias"):
        model.load_state_dict(partial)
    assert model.load_state_dict(partial, strict=False).missing_keys == ["head.bias"]
    # The sharded state dict still loads as it is.
    model.load_state_dict(shards)
    torch.testing.assert_close(model.module.body.weight.full_tensor(), _Net().body.weight)

    # Unmarked methods that run the model raise under FSDP too.
    x, y = _rank_batch(fabric.global_rank)
    _expect_unmarked_error(lambda: model.compute_loss(x, y), "compute_loss")

    # 16-mixed: two optimizers step after one backward.
    body, head = fabric.setup_optimizers(
        torch.optim.SGD(model.body.parameters(), lr=0.1), torch.optim.SGD(model.head.parameters(), lr=0.1)
    )
    before = [param.full_tensor() for param in model.parameters()]
    model.mark_forward_method("compute_loss")
    for _ in range(4):  # the first steps may be skipped while the scale comes down from 2**16
        fabric.backward(model.compute_loss(x, y))
        body.step()
        head.step()
        body.zero_grad()
        head.zero_grad()
    after = [param.full_tensor() for param in model.parameters()]
    assert all(not torch.equal(old, new) for old, new in zip(before, after, strict=True))
    return {"rank": fabric.global_rank}


def test_fsdp_loads_a_full_state_dict_and_unmarked_methods_raise() -> None:
    strategy = FSDPStrategy(start_method="fork")
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy, precision="16-mixed")
    assert fabric.launch(_fsdp_checks) == {"rank": 0}
