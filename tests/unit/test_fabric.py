"""Fabric in one process: wrappers, precision, the loop's methods, checkpoints and misuse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from handloom import Fabric, is_wrapped
from handloom.plugins.precision import MixedPrecision
from handloom.strategies import SingleDeviceStrategy


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)
        self.custom = "kept"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.layer(x)))

    def generate(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x) * 2


def make(precision: Any = None) -> tuple[Fabric, Any, Any]:
    fabric = Fabric(accelerator="cpu", devices=1, precision=precision)
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, opt = fabric.setup(model, optimizer)
    return fabric, wrapped, opt


def test_wrapped_module_behaves_like_the_original() -> None:
    fabric = Fabric(accelerator="cpu")
    model = Net()
    wrapped = fabric.setup(model)
    assert is_wrapped(wrapped) and wrapped.module is model
    assert list(wrapped.state_dict()) == list(model.state_dict())
    assert wrapped.custom == "kept"
    wrapped.custom = "changed"
    assert model.custom == "changed"
    x = torch.randn(5, 4)
    assert torch.equal(wrapped(x), model(x))
    assert torch.equal(wrapped.generate(x), model.generate(x))
    wrapped.mark_forward_method("generate")
    with pytest.raises(ValueError, match="forward"):
        wrapped.mark_forward_method("forward")
    with pytest.raises(AttributeError, match="'sample'"):
        wrapped.mark_forward_method("sample")
    wrapped.eval()
    assert not model.training
    state = {k: v.clone() for k, v in wrapped.state_dict().items()}
    wrapped.load_state_dict(state)


def test_wrapped_optimizer_is_an_instance_of_its_class() -> None:
    _, _, optimizer = make()
    assert isinstance(optimizer, torch.optim.SGD)
    assert type(optimizer).__name__ == "FabricSGD"
    optimizer.param_groups[0]["lr"] = 0.5
    assert optimizer.optimizer.param_groups[0]["lr"] == 0.5
    state = optimizer.state_dict()
    optimizer.load_state_dict(state)
    optimizer.param_groups[0]["lr"] = 0.25  # still the original's groups after a load
    assert optimizer.optimizer.param_groups[0]["lr"] == 0.25


def test_training_matches_plain_pytorch_bit_for_bit() -> None:
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(5)]
    torch.manual_seed(0)
    plain = Net()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=0.01)
    fabric = Fabric(accelerator="cpu")
    torch.manual_seed(0)
    mine = Net()
    model, opt = fabric.setup(mine, torch.optim.AdamW(mine.parameters(), lr=0.01))
    for x, y in data:
        plain_opt.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        plain_opt.step()
        opt.zero_grad()
        fabric.backward(nn.functional.cross_entropy(model(x), y))
        opt.step()
    for a, b in zip(plain.parameters(), mine.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("precision", "param_dtype", "out_dtype"),
    [("bf16-mixed", torch.float32, torch.float32), ("16-mixed", torch.float32, torch.float32),
     ("bf16-true", torch.bfloat16, torch.float32), ("64-true", torch.float64, torch.float32)],
)  # fmt: skip
def test_precisions_train_on_cpu(precision: str, param_dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    fabric, model, opt = make(precision)
    assert model.module.layer.weight.dtype == param_dtype
    before = model.module.layer.weight.detach().clone()
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    out = model(x)
    assert out.dtype == out_dtype
    fabric.backward(nn.functional.cross_entropy(out, y))
    opt.step()
    assert not torch.equal(before, model.module.layer.weight)


def test_16_mixed_runs_fp16_autocast_with_a_cpu_grad_scaler() -> None:
    fabric, model, opt = make(MixedPrecision("16-mixed", "cpu"))
    scaler = fabric.strategy.amp.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() == 65536.0
    with fabric.autocast():
        assert model.module.layer(torch.randn(2, 4)).dtype == torch.float16
    loss = model(torch.randn(8, 4)).sum()
    loss.backward()  # not scaled: the step must refuse
    with pytest.raises(RuntimeError, match=r"fabric\.backward\(loss\)"):
        opt.step()


def test_clip_gradients_unscales_fp16_gradients_first() -> None:
    fabric, model, opt = make(MixedPrecision("16-mixed", "cpu"))
    x = torch.randn(8, 4)
    fabric.backward(model(x).mean())
    scaled = model.module.layer.weight.grad.clone()
    norm = fabric.clip_gradients(model, opt, max_norm=1e9)
    assert norm is not None
    unscaled = model.module.layer.weight.grad
    assert torch.allclose(unscaled * fabric.strategy.amp.scaler.get_scale(), scaled)
    # The reported norm is the norm of the true (unscaled) gradients.
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isclose(norm, torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])), rtol=1e-3)


def test_clip_gradients_by_norm_and_value() -> None:
    fabric, model, opt = make()
    fabric.backward(model(torch.randn(8, 4) * 100).pow(2).sum())
    norm = fabric.clip_gradients(model, opt, max_norm=1.0)
    assert norm is not None and norm > 1.0
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert total == pytest.approx(1.0, rel=1e-4)
    assert fabric.clip_gradients(model, opt, clip_val=0.01) is None
    assert max(p.grad.abs().max().item() for p in model.parameters()) <= 0.01 + 1e-7
    model.module.layer.weight.grad[0, 0] = float("nan")
    with pytest.raises(
        RuntimeError, match=r"norm of order 2.0 of the gradients is nan.*error_if_nonfinite=False"
    ):
        fabric.clip_gradients(model, opt, max_norm=1.0, error_if_nonfinite=True)


def test_misuse_errors_name_the_problem() -> None:
    fabric = Fabric(accelerator="cpu")
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, wrapped_opt = fabric.setup(model, opt)
    with pytest.raises(ValueError, match="already set up"):
        fabric.setup(wrapped)
    with pytest.raises(ValueError, match="already set up"):
        fabric.setup(model)
    with pytest.raises(ValueError, match="already set up"):
        fabric.setup_optimizers(opt)
    with pytest.raises(TypeError, match="Net"):
        fabric.clip_gradients(Net(), wrapped_opt, max_norm=1.0)
    with pytest.raises(TypeError, match="SGD"):
        fabric.clip_gradients(wrapped, opt, max_norm=1.0)
    with pytest.raises(ValueError, match=r"clip_val=None, max_norm=None"):
        fabric.clip_gradients(wrapped, wrapped_opt)
    with pytest.raises(ValueError, match=r"clip_val=1.0, max_norm=1.0"):
        fabric.clip_gradients(wrapped, wrapped_opt, clip_val=1.0, max_norm=1.0)
    with pytest.raises(TypeError, match="Net"):
        fabric.no_backward_sync(Net())
    with pytest.raises(TypeError, match="list"):
        fabric.setup_dataloaders([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no dataloader"):
        fabric.setup_dataloaders()
    with pytest.raises(TypeError, match="str"):
        fabric.setup(Net(), "adam")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="first argument"):
        fabric.launch(lambda: None)
    with pytest.raises(TypeError, match="needs a function"):
        fabric.launch(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduce_op='median'"):
        fabric.all_reduce(torch.tensor(1.0), reduce_op="median")
    with pytest.raises(RuntimeError, match="no logger"):
        _ = fabric.logger


def test_several_devices_without_launch_is_an_error() -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    with pytest.raises(RuntimeError, match=r"devices=2.*fabric\.launch\(\)"):
        fabric.setup(Net())
    with pytest.raises(RuntimeError, match="launch"):
        fabric.barrier()
    with pytest.raises(TypeError, match=r"fabric\.launch\(train\)"):
        fabric.launch()


def test_dataloader_wrapper_sets_epochs_and_passes_attributes() -> None:
    fabric = Fabric(accelerator="cpu")
    loader = DataLoader(TensorDataset(torch.arange(10.0)), batch_size=3, shuffle=True)
    wrapped = fabric.setup_dataloaders(loader)
    assert len(wrapped) == 4 and wrapped.batch_size == 3 and wrapped.dataset is loader.dataset
    assert sorted(torch.cat([b[0] for b in wrapped]).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="already set up"):
        fabric.setup_dataloaders(wrapped)
    assert fabric.setup_dataloaders(loader, loader)[1].dataloader is loader


def test_collectives_with_one_process_return_at_once() -> None:
    fabric = Fabric(accelerator="cpu")
    t = torch.arange(3.0)
    assert fabric.all_gather(t) is t
    assert torch.equal(fabric.all_reduce(t, reduce_op="sum"), t)
    assert fabric.all_reduce(3.0).item() == 3.0
    assert fabric.broadcast({"a": 1}) == {"a": 1}
    assert fabric.all_reduce({"x": t, "y": [t]})["y"][0] is t
    fabric.barrier()
    with fabric.rank_zero_first():
        pass
    assert (fabric.global_rank, fabric.local_rank, fabric.node_rank, fabric.world_size) == (0, 0, 0, 1)
    assert fabric.is_global_zero and fabric.device == torch.device("cpu")


def test_init_module_and_init_tensor() -> None:
    fabric = Fabric(accelerator="cpu", precision="64-true")
    with fabric.init_tensor():
        assert torch.ones(2).dtype == torch.float64
    with fabric.init_module():
        assert nn.Linear(2, 2).weight.dtype == torch.float64
    assert torch.ones(1).dtype == torch.float32
    fabric = Fabric(accelerator="cpu")
    target = torch.zeros(3)
    with fabric.init_module(empty_init=True):
        returned = nn.init.constant_(target, 5.0)
        nn.init.kaiming_uniform_(target)
        layer = nn.Linear(2, 2)
    assert returned is target and torch.equal(target, torch.zeros(3))  # init functions were skipped
    assert layer.weight.shape == (2, 2)
    torch.manual_seed(0)
    initialised = nn.Linear(64, 64).weight.detach().clone()
    torch.manual_seed(0)
    with fabric.init_module(empty_init=False):
        normal = nn.Linear(64, 64)
    assert torch.equal(normal.weight, initialised)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    fabric, model, opt = make()
    fabric.backward(model(torch.randn(4, 4)).sum())
    opt.step()
    path = tmp_path / "ckpt" / "last.ckpt"
    fabric.save(path, {"model": model, "optimizer": opt, "step": 7, "tensor": torch.ones(2)})
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left
    raw = torch.load(path, weights_only=True)
    assert list(raw["model"]) == ["layer.weight", "layer.bias", "head.weight", "head.bias"]
    _, other, other_opt = make()
    state: dict[str, Any] = {"model": other, "optimizer": other_opt, "step": 0}
    remainder = fabric.load(path, state)
    assert state["step"] == 7 and list(remainder) == ["tensor"]
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    assert other_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    with pytest.raises(KeyError, match="'epoch'"):
        fabric.load(path, {"epoch": 0})
    assert fabric.load(path, {"epoch": 0}, strict=False).keys() >= {"model"}
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        fabric.load(tmp_path / "missing.ckpt", {})
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=r"torn\.ckpt"):
        fabric.load(torn, {})
    torch.save(model.module.state_dict(), tmp_path / "raw.pt")
    fresh = Net()
    fabric.load_raw(tmp_path / "raw.pt", fresh)
    assert torch.equal(fresh.layer.weight, model.module.layer.weight)


def test_save_filter_and_its_errors(tmp_path: Path) -> None:
    fabric, model, _ = make()
    fabric.save(
        tmp_path / "f.ckpt", {"model": model}, filter={"model": lambda name, _: name.startswith("head")}
    )
    assert list(torch.load(tmp_path / "f.ckpt", weights_only=True)["model"]) == ["head.weight", "head.bias"]
    with pytest.raises(ValueError, match="'optimizer'"):
        fabric.save(tmp_path / "g.ckpt", {"model": model}, filter={"optimizer": lambda *_: True})
    with pytest.raises(TypeError, match="filter"):
        fabric.save(tmp_path / "g.ckpt", {"model": model}, filter=[1])


def test_callbacks_and_loggers() -> None:
    seen: list[Any] = []

    class Callback:
        def on_after_setup(self, fabric: Fabric, module: Any) -> None:
            seen.append(("setup", module))

        def on_after_optimizer_step(self, strategy: Any, optimizer: Any) -> None:
            seen.append(("step", optimizer))

        def custom(self, value: int) -> None:
            seen.append(("custom", value))

    class Logger:
        def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
            seen.append(("log", metrics, step))

    fabric = Fabric(accelerator="cpu", callbacks=Callback(), loggers=[Logger()])
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, wrapped_opt = fabric.setup(model, opt)
    fabric.backward(wrapped(torch.randn(2, 4)).sum())
    wrapped_opt.step()
    fabric.call("custom", value=3, ignored=True)
    fabric.log("loss", torch.tensor(0.5), step=1)
    assert [s[0] for s in seen] == ["setup", "step", "custom", "log"]
    assert seen[2] == ("custom", 3) and seen[3] == ("log", {"loss": 0.5}, 1)


def test_subclass_run_pattern() -> None:
    class MyFabric(Fabric):
        def run(self, value: int) -> int:
            return value * self.world_size + 1

    assert MyFabric(accelerator="cpu").run(4) == 5


def test_single_device_strategy_instance_and_print(capsys: pytest.CaptureFixture[str]) -> None:
    fabric = Fabric(strategy=SingleDeviceStrategy(device="cpu"))
    fabric.print("hello", 1)
    assert capsys.readouterr().out == "hello 1\n"
    assert fabric.to_device({"x": torch.ones(1)})["x"].device.type == "cpu"
    with pytest.raises(RuntimeError, match="another Fabric"):
        strategy = SingleDeviceStrategy()
        Fabric(strategy=strategy)
        Fabric(strategy=strategy, precision="bf16-mixed")


def test_seed_everything_is_reproducible() -> None:
    Fabric.seed_everything(123)
    a = torch.rand(3)
    Fabric.seed_everything(123)
    assert torch.equal(a, torch.rand(3))
