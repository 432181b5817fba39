"""Precision plugins with Lightning's protocol: built-in ones per precision name, a user's own
subclass honoured hook by hook, bitsandbytes quantization on the CPU, and clear refusals."""

from __future__ import annotations

import importlib
import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytest
import torch
from torch import nn

from handloom import Fabric
from handloom.plugins import (
    DoublePrecision,
    FSDPPrecision,
    HalfPrecision,
    MixedPrecision,
    Precision,
)
from handloom.strategies import ModelParallelStrategy


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.dtype)
        return self.layer(x)


def set_up(**kwargs: Any) -> tuple[Fabric, Any, Any, Net]:
    fabric = Fabric(accelerator="cpu", devices=1, **kwargs)
    torch.manual_seed(0)
    net = Net()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    return fabric, model, optimizer, net


@pytest.mark.parametrize(
    ("precision", "kind", "param_dtype", "input_dtype"),
    [("32-true", Precision, torch.float32, torch.float32),
     ("64-true", DoublePrecision, torch.float64, torch.float64),
     ("16-true", HalfPrecision, torch.float16, torch.float16),
     ("bf16-true", HalfPrecision, torch.bfloat16, torch.bfloat16),
     ("bf16-mixed", MixedPrecision, torch.float32, torch.bfloat16)],
)  # fmt: skip
def test_each_precision_name_gives_lightnings_plugin_and_its_conversions(
    precision: str, kind: type, param_dtype: torch.dtype, input_dtype: torch.dtype
) -> None:
    fabric, model, optimizer, net = set_up(precision=precision)
    plugin = fabric.strategy.precision
    assert type(plugin) is kind and plugin.precision == precision
    assert net.layer.weight.dtype == param_dtype
    out = model(torch.randn(3, 4))
    # Inputs are converted to the precision's dtype (bf16 for bf16-mixed too, as in Lightning),
    # outputs come back in the default dtype.
    assert net.seen == [input_dtype]
    assert out.dtype == torch.float32
    assert model(x=torch.randn(3, 4)).dtype == torch.float32 and net.seen[-1] == input_dtype  # keywords too
    fabric.backward(out.sum())
    optimizer.step()


def test_the_plugin_is_known_before_launch_as_in_lightning() -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn", precision="bf16-true")
    assert isinstance(fabric.strategy.precision, HalfPrecision)
    assert fabric.strategy.precision.precision == "bf16-true"


class Recording(Precision):
    """A user's plugin written for Lightning: every hook records that it ran."""

    precision = "32-true"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def convert_module(self, module: nn.Module) -> nn.Module:
        self.calls.append("convert_module")
        return module

    def module_init_context(self) -> AbstractContextManager[Any]:
        self.calls.append("module_init_context")
        return nullcontext()

    def tensor_init_context(self) -> AbstractContextManager[Any]:
        self.calls.append("tensor_init_context")
        return nullcontext()

    def forward_context(self) -> AbstractContextManager[Any]:
        self.calls.append("forward_context")
        return nullcontext()

    def convert_input(self, data: Any) -> Any:
        self.calls.append("convert_input")
        (args, kwargs) = data
        return tuple(a * 2 for a in args), kwargs

    def convert_output(self, data: Any) -> Any:
        self.calls.append("convert_output")
        return data + 100

    def pre_backward(self, tensor: torch.Tensor, module: nn.Module | None) -> None:
        self.calls.append("pre_backward")

    def backward(self, tensor: torch.Tensor, model: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        self.calls.append("backward")
        (tensor * 0.5).backward(*args, **kwargs)

    def post_backward(self, tensor: torch.Tensor, module: nn.Module | None) -> None:
        self.calls.append("post_backward")

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        self.calls.append("optimizer_step")
        return optimizer.step(**kwargs)

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        self.calls.append("unscale_gradients")

    def state_dict(self) -> dict[str, Any]:
        return {"calls": len(self.calls)}


@pytest.mark.parametrize("where", ["plugins", "precision"])
def test_a_users_plugin_is_used_hook_by_hook(where: str) -> None:
    plugin = Recording()
    kwargs: dict[str, Any] = {"plugins": [plugin]} if where == "plugins" else {"precision": plugin}
    fabric = Fabric(accelerator="cpu", devices=1, **kwargs)
    assert fabric.strategy.precision is plugin
    with fabric.init_module():
        net = nn.Linear(4, 1)
    with fabric.init_tensor():
        x = torch.ones(1, 4)
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    with torch.no_grad():
        expected = net(x * 2) + 100  # the plugin's input and output conversions
    out = model(x)
    assert torch.equal(out, expected)
    fabric.backward(out.sum())
    grad = net.weight.grad.clone()
    assert torch.allclose(grad, 0.5 * (x * 2))  # the plugin's backward scaled the loss by 0.5
    fabric.clip_gradients(model, optimizer, max_norm=1e6)
    optimizer.step()
    for hook in ["module_init_context", "tensor_init_context", "convert_module", "convert_input",
                 "forward_context", "convert_output", "pre_backward", "backward", "post_backward",
                 "unscale_gradients", "optimizer_step"]:  # fmt: skip
        assert hook in plugin.calls, hook
    with fabric.autocast():
        pass
    assert plugin.calls[-1] == "forward_context"


def test_a_precision_plugin_given_twice_or_beside_a_name_is_refused() -> None:
    with pytest.raises(ValueError, match=r"precision='bf16-mixed'.*MixedPrecision.*Pass only one"):
        Fabric(accelerator="cpu", precision="bf16-mixed", plugins=[MixedPrecision("bf16-mixed", "cpu")])
    with pytest.raises(ValueError, match=r"2 precision plugins \(DoublePrecision, Precision\)"):
        Fabric(accelerator="cpu", plugins=[DoublePrecision(), Precision()])


def test_plugin_constructors_reject_what_cannot_work() -> None:
    with pytest.raises(ValueError, match=r"MixedPrecision\(precision='16-true'\).*'bf16-mixed'"):
        MixedPrecision("16-true", "cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"bfloat16 needs no gradient scaler"):
        MixedPrecision("bf16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match=r"HalfPrecision\(precision='32-true'\)"):
        HalfPrecision("32-true")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"FSDPPrecision\(precision='64-true'\) is not supported"):
        FSDPPrecision("64-true")
    with pytest.raises(ValueError, match=r"only '16-mixed' scales"):
        FSDPPrecision("bf16-mixed", scaler=torch.amp.GradScaler("cpu"))


def test_fp16_mixed_plugin_scales_on_the_cpu_and_its_scaler_rides_in_a_checkpoint(tmp_path: Any) -> None:
    fabric, model, optimizer, _ = set_up(plugins=[MixedPrecision("16-mixed", "cpu")])
    plugin = fabric.strategy.precision
    assert isinstance(plugin, MixedPrecision) and plugin.scaler is not None
    fabric.backward(model(torch.randn(3, 4)).sum())
    optimizer.step()
    fabric.save(tmp_path / "ckpt.pt", {"precision": plugin})
    assert torch.load(tmp_path / "ckpt.pt")["precision"]["scale"] == plugin.scaler.get_scale()


def test_model_parallel_refuses_precisions_lightning_refuses() -> None:
    with pytest.raises(ValueError, match=r"precision='16-mixed'\): ModelParallelStrategy does not support"):
        Fabric(
            accelerator="cpu", devices=2, strategy=ModelParallelStrategy(lambda m, _: m), precision="16-mixed"
        )


@pytest.mark.parametrize("name", ["DeepSpeedPrecision", "XLAPrecision"])
def test_precisions_of_engines_handloom_does_not_run_refuse_with_a_way_out(name: str) -> None:
    cls = getattr(importlib.import_module("handloom.plugins"), name)
    with pytest.raises(NotImplementedError, match=r"precision='bf16-mixed'.*instead"):
        cls("bf16-mixed")


def test_transformer_engine_without_its_package_names_the_hardware_and_the_package() -> None:
    from handloom.plugins import TransformerEnginePrecision

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("transformer_engine is installed: the GPU test covers it")
    with pytest.raises(ModuleNotFoundError, match=r"Hopper.*pip install 'transformer_engine\[pytorch\]'"):
        TransformerEnginePrecision(weights_dtype=torch.bfloat16)


# --- bitsandbytes (quantizes on the CPU since 0.45) ------------------------------------------------
bnb = pytest.importorskip("bitsandbytes")


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.head = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.up(x)))


@pytest.mark.parametrize(
    ("mode", "layer", "weight_dtype", "tolerance"),
    [("nf4", "Linear4bit", torch.uint8, 0.25), ("nf4-dq", "Linear4bit", torch.uint8, 0.25),
     ("fp4", "Linear4bit", torch.uint8, 0.35), ("fp4-dq", "Linear4bit", torch.uint8, 0.35),
     ("int8", "Linear8bitLt", torch.int8, 0.05), ("int8-training", "Linear8bitLt", torch.float16, 0.05)],
)  # fmt: skip
def test_bitsandbytes_quantizes_every_linear_on_the_cpu(
    mode: str, layer: str, weight_dtype: torch.dtype, tolerance: float
) -> None:
    from handloom.plugins import BitsandbytesPrecision

    torch.manual_seed(0)
    reference = Mlp()
    model = Mlp()
    model.load_state_dict(reference.state_dict())
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[BitsandbytesPrecision(mode)])  # type: ignore[arg-type]
    model = fabric.setup_module(model)
    for name in ("up", "head"):
        replaced = getattr(model.module, name)
        assert isinstance(replaced, getattr(bnb.nn, layer)), name
        assert replaced.weight.dtype == weight_dtype
    x = torch.randn(16, 64)
    with torch.no_grad():
        out = model(x)
        expected = reference(x)
    assert out.dtype == torch.float32
    relative = (out - expected).norm() / expected.norm()
    assert relative < tolerance, relative


def test_bitsandbytes_keeps_ignored_modules_and_quantizes_weights_loaded_into_init_module() -> None:
    from handloom.plugins import BitsandbytesPrecision

    torch.manual_seed(0)
    reference = Mlp()
    fabric = Fabric(accelerator="cpu", plugins=[BitsandbytesPrecision("nf4", ignore_modules={"head"})])
    kept = fabric.setup_module(Mlp())
    assert type(kept.module.head) is nn.Linear and isinstance(kept.module.up, bnb.nn.Linear4bit)
    with pytest.raises(RuntimeError, match=r"ignore_modules=\{'head'\}.*Build the model outside init_module"):
        fabric.init_module().__enter__()

    fabric = Fabric(accelerator="cpu", plugins=[BitsandbytesPrecision("nf4", dtype=torch.bfloat16)])
    with fabric.init_module(empty_init=True):
        built = Mlp()
    assert isinstance(built.up, bnb.nn.Linear4bit)
    built.load_state_dict(reference.state_dict())  # full-precision weights are quantized on load
    assert built.up.weight.dtype == torch.uint8
    model = fabric.setup_module(built)
    x = torch.randn(16, 64)
    with torch.no_grad():
        relative = (model(x) - reference(x)).norm() / reference(x).norm()
    assert relative < 0.25, relative


def test_bitsandbytes_refuses_what_cannot_work() -> None:
    from handloom.plugins import BitsandbytesPrecision

    with pytest.raises(ValueError, match=r"mode='nf8'.*'nf4'"):
        BitsandbytesPrecision("nf8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"int8.*float16 only"):
        BitsandbytesPrecision("int8", dtype=torch.bfloat16)
    fabric = Fabric(accelerator="cpu", plugins=[BitsandbytesPrecision("nf4")])
    with pytest.raises(TypeError, match=r"Sequential has\s+none"):
        fabric.setup_module(nn.Sequential(nn.ReLU()))


def test_bitsandbytes_missing_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from handloom.plugins.precision import bitsandbytes as plugin_module

    plugin_module._import_bitsandbytes.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    try:
        with pytest.raises(ModuleNotFoundError, match=r"pip install 'bitsandbytes>=0.45'"):
            plugin_module.BitsandbytesPrecision("nf4")
    finally:
        plugin_module._import_bitsandbytes.cache_clear()


def test_backward_and_step_follow_lightnings_protocol_exactly() -> None:
    from unittest.mock import Mock

    tensor = Mock()
    Precision().backward(tensor, None, "positional-arg", keyword="arg")
    tensor.backward.assert_called_once_with("positional-arg", keyword="arg")

    plugin = MixedPrecision("16-mixed", "cpu")
    scaler = Mock()
    scaler.scale = Mock(side_effect=lambda x: x)
    plugin.scaler = scaler
    tensor = Mock()
    plugin.backward(tensor, Mock(), "positional-arg", keyword="arg")
    scaler.scale.assert_called_once_with(tensor)
    tensor.backward.assert_called_once_with("positional-arg", keyword="arg")
    optimizer = Mock()
    plugin.optimizer_step(optimizer, keyword="arg")
    scaler.step.assert_called_once_with(optimizer, keyword="arg")
    scaler.update.assert_called_once()

    optimizer = Mock()
    MixedPrecision("bf16-mixed", "cpu").optimizer_step(optimizer, keyword="arg")
    optimizer.step.assert_called_once_with(keyword="arg")
