"""FSDP2 through FSDPStrategy on real gloo process groups (2 forked processes; 4 for hybrid sharding).

What users rely on: the same numbers as plain PyTorch, shards that really are shards, the
article's snippet, several models, meta-device init, gradient accumulation, clipping, precision.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from handloom import Fabric
from handloom.strategies import FSDPStrategy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

STEPS = 10
GLOBAL_BATCH = 8


def _fabric(strategy: Any, devices: int = 2, **kwargs: Any) -> Fabric:
    if isinstance(strategy, FSDPStrategy):
        strategy.start_method = "fork"
    return Fabric(accelerator="cpu", devices=devices, strategy=strategy, **kwargs)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    )


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [
        (torch.randn(GLOBAL_BATCH, 6, generator=gen), torch.randn(GLOBAL_BATCH, 3, generator=gen))
        for _ in range(STEPS)
    ]


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def _train(fabric: Fabric) -> dict[str, Any]:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model, optimizer = fabric.setup(model, optimizer)
    losses = []
    for x, y in _batches():
        xs, ys = (
            x.chunk(fabric.world_size)[fabric.global_rank],
            y.chunk(fabric.world_size)[fabric.global_rank],
        )
        loss = nn.functional.mse_loss(model(xs), ys)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(fabric.all_reduce(loss.detach()).item())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    return {
        "losses": losses,
        "params": {name: _full(p) for name, p in model.module.named_parameters()},
        "local_numel": local,
        "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
    }


def _plain_reference() -> dict[str, Any]:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for x, y in _batches():
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "params": {n: p.detach() for n, p in model.named_parameters()}}


@pytest.mark.parametrize(
    ("strategy", "devices", "shards"),
    [
        pytest.param(lambda: FSDPStrategy(auto_wrap_policy={nn.Linear}), 2, 2, id="FULL_SHARD"),
        pytest.param(lambda: FSDPStrategy(sharding_strategy="SHARD_GRAD_OP"), 2, 2, id="SHARD_GRAD_OP"),
        pytest.param(lambda: FSDPStrategy(sharding_strategy="NO_SHARD"), 2, 1, id="NO_SHARD"),
        pytest.param(
            lambda: FSDPStrategy(
                sharding_strategy="HYBRID_SHARD", device_mesh=(2, 2), auto_wrap_policy={nn.Linear}
            ),
            4,
            2,
            id="HYBRID_SHARD-2x2",
        ),
        pytest.param(lambda: "ddp_fork", 2, None, id="DDP"),
    ],
)
def test_losses_and_weights_match_plain_pytorch(strategy: Any, devices: int, shards: int | None) -> None:
    result = _fabric(strategy(), devices=devices).launch(_train)
    reference = _plain_reference()
    torch.testing.assert_close(result["losses"], reference["losses"], rtol=1e-5, atol=1e-6)
    for name, expected in reference["params"].items():
        torch.testing.assert_close(result["params"][name], expected, rtol=1e-5, atol=1e-6, msg=name)
    if shards is None:  # DDP
        return
    assert result["sharded"]
    total = sum(p.numel() for p in reference["params"].values())
    # Each process holds 1/shards of every parameter (dim-0 chunks: a 3-row weight splits 2 + 1).
    assert math.ceil(total / shards) <= result["local_numel"] <= math.ceil(total / shards) + 32


def _decoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.TransformerDecoder(layer, num_layers=2)


def _decoder_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 5, 16, generator=gen), torch.randn(4, 3, 16, generator=gen)) for _ in range(4)]


def _article_snippet(fabric: Fabric) -> dict[str, Any]:
    from handloom.sharding.apply import is_checkpointed

    model = _decoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = fabric.setup(model, optimizer)
    layers = list(model.module.layers)
    calls = [0]
    layers[0].linear1.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    losses = []
    out_dtype = None
    for tgt, memory in _decoder_batches():
        out = model(tgt.chunk(2)[fabric.global_rank], memory.chunk(2)[fabric.global_rank])
        out_dtype = out.dtype
        loss = out.pow(2).mean()
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(fabric.all_reduce(loss.detach()).item())
    return {
        "losses": losses,
        "layers_sharded": all(isinstance(layer, FSDPModule) for layer in layers),
        "layers_checkpointed": all(is_checkpointed(layer) for layer in layers),
        "recomputed": calls[0] == 2 * len(_decoder_batches()),  # forward, and again in backward
        "out_dtype": str(out_dtype),
        "master_dtype": str(next(model.parameters()).dtype),
        "keys": list(model.state_dict()),
    }


def _decoder_reference() -> list[float]:
    model = _decoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for tgt, memory in _decoder_batches():
        loss = model(tgt, memory).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_articles_fsdp_snippet(precision: str) -> None:
    # As written in the article (accelerator/devices adapted to CPU processes).
    fsdp_strategy = FSDPStrategy(
        auto_wrap_policy={nn.TransformerDecoderLayer},  # wrap each decoder layer
        activation_checkpointing_policy={nn.TransformerDecoderLayer},
        cpu_offload=False,
    )
    result = _fabric(fsdp_strategy, precision=precision).launch(_article_snippet)
    assert result["layers_sharded"] and result["layers_checkpointed"] and result["recomputed"]
    assert result["out_dtype"] == "torch.float32" and result["master_dtype"] == "torch.float32"
    assert result["keys"] == list(_decoder().state_dict())  # no wrapper prefixes in checkpoints
    reference = _decoder_reference()
    if precision == "32-true":
        torch.testing.assert_close(result["losses"], reference, rtol=1e-5, atol=1e-6)
    else:  # bf16 compute: same trajectory to bf16 accuracy
        torch.testing.assert_close(result["losses"], reference, rtol=5e-2, atol=1e-2)


def _gan_and_setup_order(fabric: Fabric) -> dict[str, Any]:
    torch.manual_seed(0)
    generator, discriminator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8)), nn.Linear(8, 1)
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=1e-3)
    generator, opt_g = fabric.setup(generator, opt_g)
    discriminator, opt_d = fabric.setup(discriminator, opt_d)
    for _ in range(3):
        fake = generator(torch.randn(4, 4))
        d_loss = (
            nn.functional.softplus(discriminator(fake.detach())).mean()
            + nn.functional.softplus(-discriminator(torch.randn(4, 8))).mean()
        )
        fabric.backward(d_loss)
        opt_d.step()
        opt_d.zero_grad()
        g_loss = nn.functional.softplus(-discriminator(fake)).mean()
        fabric.backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
    # Teacher/student: a frozen teacher set up without an optimizer guides the student.
    teacher = fabric.setup_module(nn.Linear(8, 8).requires_grad_(False))
    student_net = nn.Linear(8, 8)
    student_net, opt_s = fabric.setup(student_net, torch.optim.SGD(student_net.parameters(), lr=0.5))
    inputs = torch.randn(16, 8, generator=torch.Generator().manual_seed(fabric.global_rank))
    distill = []
    for _ in range(5):
        with torch.no_grad():
            target = teacher(inputs)
        loss = nn.functional.mse_loss(student_net(inputs), target)
        fabric.backward(loss)
        opt_s.step()
        opt_s.zero_grad()
        distill.append(fabric.all_reduce(loss.detach()).item())
    messages = {}
    # Wrong order: the optimizer was built from the parameters before sharding replaced them.
    student = nn.Linear(8, 8)
    early = torch.optim.SGD(student.parameters(), lr=0.1)
    student = fabric.setup_module(student)
    try:
        fabric.setup_optimizers(early)
    except RuntimeError as err:
        messages["early"] = str(err)
    # The right order works.
    fabric.setup_optimizers(torch.optim.SGD(student.parameters(), lr=0.1))
    # An optimizer that has stepped cannot be re-pointed at shards.
    teacher = nn.Linear(8, 8)
    stepped = torch.optim.Adam(teacher.parameters())
    teacher(torch.ones(1, 8)).sum().backward()
    stepped.step()
    try:
        fabric.setup(teacher, stepped)
    except RuntimeError as err:
        messages["stepped"] = str(err)
    return {
        "finite": bool(torch.isfinite(g_loss).item() and torch.isfinite(d_loss).item()),
        "opt_points_at_shards": all(
            isinstance(p, DTensor) for group in opt_g.param_groups for p in group["params"]
        ),
        "state_on_shards": all(isinstance(s["exp_avg"], DTensor) for s in opt_d.state.values()),
        "messages": messages,
        "distill": distill,
    }


def test_gan_teacher_student_and_the_setup_order() -> None:
    result = _fabric(FSDPStrategy()).launch(_gan_and_setup_order)
    assert result["finite"] and result["opt_points_at_shards"] and result["state_on_shards"]
    early = result["messages"]["early"]
    assert "SGD" in early and "'weight'" in early and "fabric.setup_module(model)" in early
    assert "taken steps" in result["messages"]["stepped"]
    assert result["distill"][-1] < result["distill"][0]


def _meta_init(fabric: Fabric) -> dict[str, Any]:
    with fabric.init_module(empty_init=True):
        model = _model()
    meta_before = all(p.is_meta for p in model.parameters())
    model = fabric.setup_module(model)
    return {
        "meta_before": meta_before,
        "local": {n: tuple(p.to_local().shape) for n, p in model.module.named_parameters()},
        "full": {n: _full(p) for n, p in model.module.named_parameters()},
    }


def _reference_init() -> dict[str, torch.Tensor]:
    """What a single process gets: build on meta, then reset_parameters module by module."""
    with torch.device("meta"):
        model = _model()
    model.to_empty(device="cpu")  # _model() seeded the generator; building on meta draws nothing
    with torch.no_grad():
        for module in model.modules():
            if next(module.parameters(recurse=False), None) is not None:
                module.reset_parameters()  # type: ignore[operator]
    return {n: p.detach() for n, p in model.named_parameters()}


def test_meta_device_init_materialises_only_each_ranks_shard() -> None:
    result = _fabric(FSDPStrategy(auto_wrap_policy={nn.Linear})).launch(_meta_init)
    assert result["meta_before"]
    assert result["local"]["0.weight"] == (16, 6) and result["local"]["5.weight"] == (2, 32)  # 3 rows: 2 + 1
    for name, expected in _reference_init().items():
        torch.testing.assert_close(result["full"][name], expected, msg=name)  # same as one process


def _sync_and_clip(fabric: Fabric) -> dict[str, Any]:
    model = _model()
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    (x1, y1), (x2, y2) = _batches()[:2]
    rank, world = fabric.global_rank, fabric.world_size
    with fabric.no_backward_sync(model, enabled=True):
        fabric.backward(nn.functional.mse_loss(model(x1.chunk(world)[rank]), y1.chunk(world)[rank]))
    no_grad_during_accumulation = all(p.grad is None for p in model.parameters())
    with fabric.no_backward_sync(model, enabled=False):
        fabric.backward(nn.functional.mse_loss(model(x2.chunk(world)[rank]), y2.chunk(world)[rank]))
    grads = {n: _full(p.grad) for n, p in model.module.named_parameters()}
    norm = fabric.clip_gradients(model, optimizer, max_norm=0.1)
    clipped = {n: _full(p.grad) for n, p in model.module.named_parameters()}
    for p in model.parameters():
        p.grad.to_local().fill_(float("nan"))
    try:
        fabric.clip_gradients(model, optimizer, max_norm=0.1)
        nonfinite = ""
    except RuntimeError as err:
        nonfinite = str(err)
    return {
        "grads": grads,
        "norm": float(norm),
        "clipped": clipped,
        "nonfinite": nonfinite,
        "quiet": no_grad_during_accumulation,
    }


def test_no_backward_sync_accumulates_and_clipping_uses_the_global_norm() -> None:
    result = _fabric(FSDPStrategy(auto_wrap_policy={nn.Linear})).launch(_sync_and_clip)
    reference = _model()
    (x1, y1), (x2, y2) = _batches()[:2]
    for x, y in ((x1, y1), (x2, y2)):  # each rank's mean loss, averaged over 2 ranks = the global mean
        nn.functional.mse_loss(reference(x), y).backward()
    expected = {n: p.grad for n, p in reference.named_parameters()}
    for name, grad in expected.items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    total = torch.nn.utils.get_total_norm(list(expected.values()))
    assert result["norm"] == pytest.approx(total.item(), rel=1e-5)
    assert result["quiet"]  # gradients were held back until the synchronising backward
    for name, grad in expected.items():
        torch.testing.assert_close(result["clipped"][name], grad * 0.1 / (total + 1e-6), rtol=1e-5, atol=1e-7)
    assert "nan" in result["nonfinite"] and "error_if_nonfinite=False" in result["nonfinite"]


def _mixed(fabric: Fabric) -> dict[str, Any]:
    model = _model()
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    losses = []
    for x, y in _batches() * 2:
        out = model(x.chunk(2)[fabric.global_rank])
        loss = nn.functional.mse_loss(out, y.chunk(2)[fabric.global_rank])
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(fabric.all_reduce(loss.detach()).item())
    scaler = fabric.strategy.amp.scaler
    return {
        "losses": losses,
        "out_dtype": str(out.dtype),
        "param_dtype": str(next(model.parameters()).dtype),
        "scale": float(scaler.get_scale()) if scaler is not None else None,
    }


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "bf16-true"])
def test_precisions_under_fsdp(precision: str) -> None:
    result = _fabric(FSDPStrategy(auto_wrap_policy={nn.Linear}), precision=precision).launch(_mixed)
    assert all(math.isfinite(v) for v in result["losses"])
    assert result["losses"][-1] < result["losses"][0]
    assert result["out_dtype"] == "torch.float32"
    assert result["param_dtype"] == ("torch.bfloat16" if precision == "bf16-true" else "torch.float32")
    assert (result["scale"] is not None) == (precision == "16-mixed")


def _compiled(fabric: Fabric) -> dict[str, Any]:
    compiled = torch.compile(_model(), backend="aot_eager")
    optimizer = torch.optim.AdamW(compiled.parameters(), lr=1e-2, weight_decay=0.1)
    model, optimizer = fabric.setup(compiled, optimizer)
    blocks = [m for m in model.module.modules() if isinstance(m, nn.Linear)]
    losses = []
    for x, y in _batches():
        xs, ys = x.chunk(2)[fabric.global_rank], y.chunk(2)[fabric.global_rank]
        loss = nn.functional.mse_loss(model(xs), ys)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(fabric.all_reduce(loss.detach()).item())
    return {
        "losses": losses,
        "compiled_blocks": all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks),
        "keys": list(model.state_dict()),
    }


def test_a_compiled_model_is_compiled_per_block_before_sharding() -> None:
    result = _fabric(FSDPStrategy(auto_wrap_policy={nn.Linear})).launch(_compiled)
    assert result["compiled_blocks"]
    assert result["keys"] == list(_model().state_dict())  # no "_orig_mod." prefix
    torch.testing.assert_close(result["losses"], _plain_reference()["losses"], rtol=1e-5, atol=1e-6)


class _WithGenerate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def generate(self, x: torch.Tensor) -> torch.Tensor:  # calls submodules directly, not forward
        return self.head(torch.relu(self.body(x))).argmax(-1)


def _generate(fabric: Fabric) -> list[int]:
    model = fabric.setup_module(_WithGenerate())
    model.mark_forward_method("generate")
    model(torch.ones(1, 4))  # after a forward pass the root's parameters are resharded
    return model.generate(torch.arange(12.0).reshape(3, 4)).tolist()


def test_marked_methods_gather_the_sharded_parameters() -> None:
    result = _fabric(FSDPStrategy()).launch(_generate)  # the root unit holds every parameter
    assert result == _WithGenerate().generate(torch.arange(12.0).reshape(3, 4)).tolist()
