"""handloom with the libraries people use around it: torchmetrics, peft (LoRA on transformers), torch.compile.

Single-process checks run in the test process; the torchmetrics synchronisation check runs on 2
forked processes with a real gloo process group.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from handloom import Fabric

REPO = Path(__file__).resolve().parents[2]


# --- torchmetrics --------------------------------------------------------------------------------------
def _rank_predictions(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0 gets 8 of 8 right, rank 1 gets 2 of 6 right: the union's accuracy is 10/14."""
    if rank == 0:
        target = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
        return target.clone(), target
    target = torch.tensor([0, 1, 2, 2, 1, 0])
    preds = torch.tensor([0, 1, 0, 0, 0, 1])
    return preds, target


def _metric_checks(fabric: Fabric) -> dict[str, Any]:
    from torchmetrics.classification import MulticlassAccuracy

    metric = fabric.to_device(MulticlassAccuracy(num_classes=3, average="micro"))
    assert metric.device == fabric.device
    preds, target = _rank_predictions(fabric.global_rank)
    metric.update(fabric.to_device(preds), fabric.to_device(target))
    local = (preds == target).float().mean().item()
    synced = metric.compute().item()  # torchmetrics gathers the states of all ranks over torch.distributed
    metric.reset()
    return {"rank": fabric.global_rank, "local": local, "synced": synced}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_torchmetrics_metric_syncs_across_ddp_processes() -> None:
    pytest.importorskip("torchmetrics")
    result = Fabric(accelerator="cpu", devices=2, strategy="ddp_fork").launch(_metric_checks)

    assert result["rank"] == 0
    assert result["local"] == 1.0  # rank 0 alone is always right ...
    assert result["synced"] == pytest.approx(10 / 14)  # ... the metric counts both ranks' predictions


def test_torchmetrics_metric_moves_with_the_model() -> None:
    torchmetrics = pytest.importorskip("torchmetrics")

    class WithMetric(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)
            self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

    fabric = Fabric(accelerator="cpu", devices=1)
    model = fabric.setup(WithMetric())
    assert model.accuracy.device == fabric.device  # a submodule metric goes wherever the model goes
    assert all(p.device == fabric.device for p in model.parameters())

    x = torch.randn(6, 4)
    logits = model(x)
    model.accuracy.update(logits, logits.argmax(dim=-1))
    assert model.accuracy.compute().item() == 1.0  # one process: no synchronisation needed


# --- peft: LoRA on a tiny Llama ------------------------------------------------------------------------
def _tiny_lora_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    model: nn.Module = peft.get_peft_model(base, lora)
    return model


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # inside peft
def test_peft_lora_trains_only_the_adapters(tmp_path: Path) -> None:
    model = _tiny_lora_llama()
    lora_names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert lora_names and all("lora_" in name for name in lora_names)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(
        (p for p in model.parameters() if p.requires_grad), lr=1e-2, weight_decay=0.0
    )

    fabric = Fabric(accelerator="cpu", devices=1)
    model, optimizer = fabric.setup(model, optimizer)
    original = model.module  # the peft model itself, with its own parameter names
    tokens = torch.randint(128, (4, 16), generator=torch.Generator().manual_seed(1))
    # Two steps: lora_B starts at zero, so lora_A gets a non-zero gradient only from the second on.
    for _ in range(2):
        loss = model(input_ids=tokens, labels=tokens).loss
        fabric.backward(loss)
        with_grad = {name for name, p in original.named_parameters() if p.grad is not None}
        assert with_grad == lora_names  # the frozen base gets no gradient at all
        optimizer.step()
        optimizer.zero_grad()

    for name, p in original.named_parameters():
        if name in lora_names:
            assert not torch.equal(p, before[name]), f"{name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    assert len(optimizer.state_dict()["state"]) == len(lora_names)  # no optimizer state for the base

    # The adapter alone, as the article saves it.
    path = tmp_path / "adapter.ckpt"
    fabric.save(path, {"model": model}, filter={"model": lambda k, v: "lora" in k})
    saved = torch.load(path, weights_only=True)["model"]
    assert set(saved) == {k for k in model.state_dict() if "lora" in k}
    assert {k for k in saved if "lora_" in k} == set(saved)
    assert sum(v.numel() for v in saved.values()) == sum(
        p.numel() for name, p in original.named_parameters() if name in lora_names
    )


# --- torch.compile -------------------------------------------------------------------------------------
def _compile_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def _train(fabric: Fabric, model: Any, optimizer: Any) -> list[float]:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=generator), torch.randint(3, (8,), generator=generator)
    losses = []
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _setup(model: nn.Module) -> tuple[Fabric, Any, Any]:
    fabric = Fabric(accelerator="cpu", devices=1)
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return fabric, model, optimizer


@pytest.fixture(scope="module")
def eager_losses() -> list[float]:
    return _train(*_setup(_compile_model()))


def test_compile_before_setup_trains_like_eager(eager_losses: list[float]) -> None:
    fabric, model, optimizer = _setup(torch.compile(_compile_model(), backend="aot_eager"))
    losses = _train(fabric, model, optimizer)
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert losses[-1] < losses[0]


def test_compile_after_setup_trains_like_eager(eager_losses: list[float]) -> None:
    fabric, model, optimizer = _setup(_compile_model())
    compiled = torch.compile(model, backend="aot_eager")
    losses = _train(fabric, compiled, optimizer)
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert losses[-1] < losses[0]
    assert list(model.state_dict()) == list(_compile_model().state_dict())  # the set-up model: no prefix


def test_compile_before_setup_state_dict_has_plain_keys(tmp_path: Path) -> None:
    plain_keys = list(_compile_model().state_dict())
    fabric, model, _ = _setup(torch.compile(_compile_model(), backend="aot_eager"))
    fabric.save(tmp_path / "model.ckpt", {"model": model})
    saved = torch.load(tmp_path / "model.ckpt", weights_only=True)["model"]
    assert list(saved) == plain_keys  # loadable into the uncompiled model
    assert list(model.state_dict()) == plain_keys


def test_importing_and_using_handloom_leaves_torch_compile_alone() -> None:
    # A fresh interpreter: in this one, handloom was imported long ago.
    code = textwrap.dedent(
        """
        import torch
        compile_function, module_compile = torch.compile, torch.nn.Module.compile
        import handloom
        from handloom import Fabric
        from handloom.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
        assert torch.compile is compile_function, "import handloom replaced torch.compile"
        fabric = Fabric(accelerator="cpu", devices=1)
        fabric.setup(torch.nn.Linear(2, 2))
        assert torch.compile is compile_function, "Fabric.setup replaced torch.compile"
        assert torch.nn.Module.compile is module_compile, "handloom replaced nn.Module.compile"
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
