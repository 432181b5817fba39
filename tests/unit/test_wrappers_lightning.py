"""The set-up model and optimizer behave as Lightning Fabric's do, in one process.

Hooks on the set-up model fire, two optimizers may step after one ``fabric.backward`` with
``16-mixed``, copies of the set-up objects work, and ``*-true`` precisions cast only real
floating-point tensors.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import torch
from torch import nn

from handloom import Fabric
from handloom.plugins.precision import MixedPrecision


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.layer(x)))

    def compute_loss(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).square().mean()


def test_methods_that_run_the_model_are_plain_calls_on_one_device() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = fabric.setup(Net())
    x = torch.randn(5, 4)
    torch.testing.assert_close(model.compute_loss(x), model.module.compute_loss(x))


def test_hooks_on_the_set_up_model_fire() -> None:
    fabric = Fabric(accelerator="cpu", devices=1, precision="64-true")
    model = fabric.setup(Net())
    seen: list[Any] = []
    handles = [
        model.register_forward_pre_hook(lambda module, args: seen.append((module is model, args[0].dtype))),
        model.register_forward_hook(lambda module, args, output: output + 100),
        model.register_full_backward_pre_hook(lambda module, grad_output: seen.append("backward pre")),
        model.register_full_backward_hook(lambda module, grad_input, grad_output: seen.append("backward")),
    ]
    x = torch.randn(3, 4, requires_grad=True)
    out = model(x)
    # The pre-hook saw the input before the precision cast it; the forward hook replaced the output.
    torch.testing.assert_close(out, model.module(x.double()).float() + 100)
    fabric.backward(out.sum())
    assert seen == [(True, torch.float32), "backward pre", "backward"]

    for handle in handles:
        handle.remove()
    seen.clear()
    torch.testing.assert_close(model(x), model.module(x.double()).float())
    fabric.backward(model(x).sum())
    assert seen == []


def test_without_hooks_a_32_true_call_goes_straight_to_the_module() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = fabric.setup(Net())
    assert model._call == model.module.__call__  # no per-call dispatch or introspection
    handle = model.register_forward_hook(lambda module, args, output: output)
    assert model._call != model.module.__call__
    handle.remove()
    model(torch.randn(1, 4))  # notices the hook is gone
    assert model._call == model.module.__call__


def _gan(
    steps: int, *, shared_backward: bool, fabric: Fabric | None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A tiny GAN; returns the generator's and the discriminator's parameters after training."""
    torch.manual_seed(0)
    gen, disc = nn.Linear(4, 4), nn.Linear(4, 1)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")

    def run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if fabric is not None:
            return module(x)
        with torch.autocast("cpu", dtype=torch.float16):
            return module(x).float()

    def backward(loss: torch.Tensor) -> None:
        if fabric is not None:
            fabric.backward(loss)
        else:
            scaler.scale(loss).backward()

    def step(optimizer: Any) -> None:
        if fabric is not None:
            optimizer.step()
        else:  # Lightning's semantics: the scale is updated after each optimizer's step
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad()

    if fabric is not None:
        gen, opt_g = fabric.setup(gen, opt_g)
        disc, opt_d = fabric.setup(disc, opt_d)
    gen_data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        z, real = torch.randn(8, 4, generator=gen_data), torch.randn(8, 4, generator=gen_data)
        if shared_backward:  # one backward through both models, then both steps
            backward(run(disc, run(gen, z)).square().mean() + run(disc, real).mean())
            step(opt_g)
            step(opt_d)
        else:
            backward(run(disc, run(gen, z).detach()).square().mean() + run(disc, real).mean())
            step(opt_d)
            backward((run(disc, run(gen, z)) - 1).square().mean())
            step(opt_g)
    return [p.detach().clone() for p in gen.parameters()], [p.detach().clone() for p in disc.parameters()]


@pytest.mark.parametrize("shared_backward", [True, False], ids=["one-backward", "two-backwards"])
def test_16_mixed_steps_two_optimizers_like_lightning(shared_backward: bool) -> None:
    start = _gan(0, shared_backward=shared_backward, fabric=None)
    expected = _gan(4, shared_backward=shared_backward, fabric=None)
    fabric = Fabric(accelerator="cpu", devices=1, precision=MixedPrecision("16-mixed", "cpu"))
    result = _gan(4, shared_backward=shared_backward, fabric=fabric)
    for got, want, before in zip(result, expected, start, strict=True):
        for g, w, b in zip(got, want, before, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
            assert not torch.equal(g, b)  # the steps were taken, not skipped


def test_16_mixed_refuses_a_second_step_of_one_optimizer_without_backward() -> None:
    fabric = Fabric(accelerator="cpu", devices=1, precision=MixedPrecision("16-mixed", "cpu"))
    model = Net()
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    fabric.backward(model(torch.randn(2, 4)).sum())
    optimizer.step()
    message = r"without fabric\.backward\(loss\) since this optimizer's last step"
    with pytest.raises(RuntimeError, match=message):
        optimizer.step()


def _assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


class _Recorder:
    def __init__(self) -> None:
        self.optimizers: list[torch.optim.Optimizer] = []

    def on_after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizers.append(optimizer)


def test_copies_of_the_set_up_optimizer_work() -> None:
    recorder = _Recorder()
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[recorder])
    model = Net()
    model, optimizer = fabric.setup(model, torch.optim.Adam(model.parameters(), lr=0.1))
    fabric.backward(model(torch.randn(2, 4)).sum())
    optimizer.step()

    shallow = copy.copy(optimizer)
    assert isinstance(shallow, torch.optim.Adam)
    assert shallow.optimizer is optimizer.optimizer and shallow.param_groups is optimizer.param_groups

    deep = copy.deepcopy(optimizer)
    assert isinstance(deep, torch.optim.Adam) and deep.optimizer is not optimizer.optimizer
    before = copy.deepcopy(optimizer.state_dict())
    _assert_same(deep.state_dict(), before)
    for group in deep.param_groups:
        group["lr"] = 0.5
        for param in group["params"]:
            param.grad = torch.ones_like(param)
    deep.step()  # a working optimizer, independent of the original
    assert recorder.optimizers[-1] is deep.optimizer
    assert deep.state_dict()["state"][0]["step"] == 2
    _assert_same(optimizer.state_dict(), before)

    restored = pickle.loads(pickle.dumps(optimizer))
    assert type(restored).__name__ == "FabricAdam"
    _assert_same(restored.state_dict(), before)


def test_copies_of_the_set_up_model_run_their_own_weights_in_the_precision() -> None:
    fabric = Fabric(accelerator="cpu", devices=1, precision="bf16-mixed")
    model = fabric.setup(Net())
    x = torch.randn(3, 4)
    expected = model(x)

    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), expected)  # bf16 autocast, as the original (fp32 differs)
    with torch.no_grad():
        twin.module.head.bias.add_(1.0)
    torch.testing.assert_close(twin(x), expected + 1.0, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(model(x), expected)

    restored = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(restored(x), expected)
    assert list(restored.state_dict()) == list(model.state_dict())


class _WithComplex(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.phase = nn.Parameter(torch.tensor([1 + 2j, 3 - 1j]))
        self.register_buffer("window", torch.tensor([0.5 + 0.5j, 1j]))
        self.register_buffer("index", torch.tensor([1, 2]))
        self.input_dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.input_dtypes = [x.dtype, z.dtype]
        return self.linear(x), z * self.phase * self.window


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("64-true", torch.float64), ("16-true", torch.float16), ("bf16-true", torch.bfloat16)],
)
def test_true_precisions_cast_only_real_floating_point_tensors(precision: str, dtype: torch.dtype) -> None:
    fabric = Fabric(accelerator="cpu", devices=1, precision=precision)
    model = fabric.setup(_WithComplex())
    assert model.linear.weight.dtype == dtype
    assert model.phase.dtype == torch.complex64
    torch.testing.assert_close(model.phase.data, torch.tensor([1 + 2j, 3 - 1j]))
    torch.testing.assert_close(model.window, torch.tensor([0.5 + 0.5j, 1j]))
    assert model.index.dtype == torch.int64

    z = torch.tensor([1 + 1j, 2 - 1j])
    _, out = model(torch.randn(2, 4), z)
    assert model.input_dtypes == [dtype, torch.complex64]  # complex inputs are left alone
    torch.testing.assert_close(out, z * torch.tensor([1 + 2j, 3 - 1j]) * torch.tensor([0.5 + 0.5j, 1j]))


def test_16_mixed_two_clipped_optimizers_are_unscaled_once_each() -> None:
    """Clip both optimizers, then step both: each is unscaled once, with the scale of this step.

    Lightning updates the scale after every optimizer step, so the second optimizer's already
    unscaled gradients would be unscaled again; handloom updates once both have stepped.
    """
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    ref_first, ref_second = copy.deepcopy(first), copy.deepcopy(second)
    x = torch.randn(3, 4)

    scaler = torch.amp.GradScaler("cpu")
    ref_opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref_first, ref_second)]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = ref_second(ref_first(x)).float().sum()
    scaler.scale(loss).backward()
    for opt, module in zip(ref_opts, (ref_first, ref_second), strict=True):
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    for opt in ref_opts:
        scaler.step(opt)
    scaler.update()

    fabric = Fabric(accelerator="cpu", devices=1, precision=MixedPrecision("16-mixed", "cpu"))
    f_first, opt_first = fabric.setup(first, torch.optim.SGD(first.parameters(), lr=0.1))
    f_second, opt_second = fabric.setup(second, torch.optim.SGD(second.parameters(), lr=0.1))
    fabric.backward(f_second(f_first(x)).sum())
    fabric.clip_gradients(f_first, opt_first, max_norm=1.0)
    fabric.clip_gradients(f_second, opt_second, max_norm=1.0)
    opt_first.step()
    opt_second.step()
    for got, want in zip(
        [*first.parameters(), *second.parameters()],
        [*ref_first.parameters(), *ref_second.parameters()],
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    scale = fabric.strategy.amp.scaler
    assert scale is not None and scale.get_scale() == scaler.get_scale()
