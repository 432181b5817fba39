"""CUDA variants (NCCL, bf16 on tensor cores); skipped without a GPU, run where one is lent."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from handloom import Fabric

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true"])
def test_single_gpu_training(precision: str) -> None:
    fabric = Fabric(accelerator="cuda", devices=1, precision=precision)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4))
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert next(model.parameters()).device.type == "cuda"
    x, y = torch.randn(32, 64, device=fabric.device), torch.randint(0, 4, (32,), device=fabric.device)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def _nccl_checks(fabric: Fabric) -> None:
    assert fabric.strategy.backend == "nccl" and fabric.device.index == fabric.local_rank
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    model = fabric.setup(model)
    fabric.backward(model(torch.full((4, 8), float(fabric.global_rank + 1), device=fabric.device)).sum())
    grads = fabric.all_gather(model.module.weight.grad)
    assert torch.equal(grads[0], grads[1])
    assert [
        t.tolist() for t in fabric.all_gather(torch.arange(fabric.global_rank + 1, device=fabric.device))
    ] == [
        [0],
        [0, 1],
    ]
    assert fabric.broadcast(torch.ones(2, device=fabric.device) * fabric.global_rank, src=1).tolist() == [
        1.0,
        1.0,
    ]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_ddp_over_nccl() -> None:
    Fabric(accelerator="cuda", devices=2, strategy="ddp_spawn", precision="bf16-mixed").launch(_nccl_checks)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(256)
        self.mlp = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def _fsdp_gpu_train(fabric: Fabric) -> list[float]:
    from torch.distributed.tensor import DTensor

    with fabric.init_module(empty_init=True):
        model = nn.Sequential(*(_Block() for _ in range(4)), nn.Linear(256, 8))
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert all(isinstance(p, DTensor) and p.device.type == "cuda" for p in model.parameters())
    gen = torch.Generator(device=fabric.device).manual_seed(fabric.global_rank)
    x = torch.randn(16, 32, 256, device=fabric.device, generator=gen)
    y = torch.randint(0, 8, (16 * 32,), device=fabric.device, generator=gen)
    losses = []
    for _ in range(20):
        out = model(x)
        assert out.dtype == torch.float32
        loss = nn.functional.cross_entropy(out.flatten(0, 1), y)
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(fabric.all_reduce(loss.detach()).item())
    return losses


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_fsdp_on_one_gpu(precision: str) -> None:
    from handloom.strategies import FSDPStrategy

    strategy = FSDPStrategy(auto_wrap_policy={_Block}, activation_checkpointing_policy={_Block})
    fabric = Fabric(accelerator="cuda", devices=1, strategy=strategy, precision=precision)
    fabric.launch()
    try:
        assert fabric.strategy.backend == "nccl"  # type: ignore[attr-defined]
        losses = _fsdp_gpu_train(fabric)
    finally:
        fabric.strategy.teardown()
    assert losses[-1] < losses[0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_fsdp_over_nccl() -> None:
    from handloom.strategies import FSDPStrategy

    strategy = FSDPStrategy(auto_wrap_policy={_Block}, start_method="spawn")
    losses = Fabric(accelerator="cuda", devices=2, strategy=strategy, precision="bf16-mixed").launch(
        _fsdp_gpu_train
    )
    assert losses[-1] < losses[0]


def _stop_on_preemption(fabric: Fabric) -> int:
    import os
    import signal

    for step in range(1, 100):
        if step == 3 and fabric.global_rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # recorded by the handler installed at step 1
        if fabric.preemption_requested():  # a CPU all-reduce on a gloo group beside NCCL
            return step
    return -1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_preemption_is_agreed_beside_nccl() -> None:
    fabric = Fabric(accelerator="cuda", devices=2, strategy="ddp_spawn")
    assert fabric.launch(_stop_on_preemption) == 3
