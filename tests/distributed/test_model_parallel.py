"""ModelParallelStrategy: tensor parallel on 2 processes and 2-D (data x tensor) on 4, against plain PyTorch.

Uses the model and ``parallelize`` function of ``examples/tensor_parallel.py``.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from handloom import Fabric
from handloom.strategies import ModelParallelStrategy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

_spec = importlib.util.spec_from_file_location(
    "tensor_parallel_example", Path(__file__).resolve().parents[2] / "examples" / "tensor_parallel.py"
)
assert _spec is not None and _spec.loader is not None
example = importlib.util.module_from_spec(_spec)
sys.modules["tensor_parallel_example"] = example
_spec.loader.exec_module(example)

CONFIG = example.Config(vocab_size=32, dim=32, n_heads=4, n_layers=2, seq_len=8)
STEPS = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return example.Transformer(CONFIG)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = example.make_dataset(4 * STEPS, CONFIG, seed=1)
    return [(data.tensors[0][4 * i : 4 * i + 4], data.tensors[1][4 * i : 4 * i + 4]) for i in range(STEPS)]


def _loss(model: Any, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def _train(fabric: Fabric, directory: Path) -> dict[str, Any]:
    strategy = fabric.strategy
    assert isinstance(strategy, ModelParallelStrategy)
    dp, tp = strategy.mesh_sizes
    dp_rank = strategy.device_mesh["data_parallel"].get_local_rank()
    model = fabric.setup_module(_model())
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2))
    losses = []
    for inputs, targets in _batches():
        loss = _loss(model, inputs.chunk(dp)[dp_rank], targets.chunk(dp)[dp_rank])
        fabric.backward(loss)
        norm = fabric.clip_gradients(model, optimizer, max_norm=1e9)  # a norm, without clipping
        optimizer.step()
        optimizer.zero_grad()
        losses.append(fabric.all_reduce(loss.detach()).item())
    fabric.save(directory / "tp", {"model": model, "optimizer": optimizer})
    # Data are sharded along the data-parallel axis only: one tensor-parallel group sees the same batches.
    loader = fabric.setup_dataloaders(DataLoader(TensorDataset(torch.arange(16)), batch_size=4, shuffle=True))
    first = next(iter(loader))[0]
    dp_group = strategy.device_mesh["data_parallel"].get_group()
    return {
        "losses": losses,
        "norm": float(norm),
        "params": {n: _full(p) for n, p in model.module.named_parameters()},
        "tp_sharded": isinstance(model.module.layers[0].attention.wq.weight, DTensor),
        "firsts": [t.tolist() for t in fabric.all_gather(first)],
        "dp_sum": fabric.all_reduce(torch.tensor(float(dp_rank)), group=dp_group, reduce_op="sum").item(),
        "sizes": (dp, tp),
    }


def _reference() -> dict[str, Any]:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, norm = [], 0.0
    for inputs, targets in _batches():
        loss = _loss(model, inputs, targets)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "norm": norm, "params": {n: p.detach() for n, p in model.named_parameters()}}


@pytest.mark.parametrize(("devices", "dp", "tp"), [(2, 1, 2), (4, 2, 2)], ids=["tp2", "dp2xtp2"])
def test_tensor_and_2d_parallel_match_plain_pytorch(devices: int, dp: int, tp: int, tmp_path: Path) -> None:
    strategy = ModelParallelStrategy(
        example.parallelize, data_parallel_size=dp, tensor_parallel_size=tp, start_method="fork"
    )
    fabric = Fabric(accelerator="cpu", devices=devices, strategy=strategy)
    result = fabric.launch(functools.partial(_train, directory=tmp_path))
    reference = _reference()
    assert result["sizes"] == (dp, tp) and result["tp_sharded"]
    torch.testing.assert_close(result["losses"], reference["losses"], rtol=1e-5, atol=1e-5)
    assert result["norm"] == pytest.approx(reference["norm"], rel=1e-4)
    for name, expected in reference["params"].items():
        torch.testing.assert_close(result["params"][name], expected, rtol=1e-4, atol=1e-5, msg=name)
    firsts = result["firsts"]
    for rank in range(devices):
        same_group = [r for r in range(devices) if r // tp == rank // tp]
        assert all(firsts[r] == firsts[rank] for r in same_group)
    if dp == 2:
        assert firsts[0] != firsts[tp]  # the two data-parallel groups see different data
    assert result["dp_sum"] == sum(range(dp))
    # The sharded checkpoint loads into the plain model.
    plain = example.Transformer(CONFIG)
    Fabric(accelerator="cpu", devices=1).load(tmp_path / "tp", {"model": plain}, strict=False)
    for name, value in plain.named_parameters():
        torch.testing.assert_close(value.detach(), result["params"][name], msg=name)


def test_bad_parallelize_fn_and_sizes_are_named() -> None:
    with pytest.raises(ValueError, match=r"data_parallel_size=3.*2 processes"):
        Fabric(
            accelerator="cpu",
            devices=2,
            strategy=ModelParallelStrategy(example.parallelize, data_parallel_size=3),
        )
    with pytest.raises(ValueError, match=r"tensor_parallel_size=0"):
        ModelParallelStrategy(example.parallelize, tensor_parallel_size=0)
    with pytest.raises(TypeError, match="parallelize_fn='not a function'"):
        ModelParallelStrategy("not a function")  # type: ignore[arg-type]


def _returns_nothing(model: nn.Module, mesh: Any) -> None:
    return None


def test_parallelize_fn_that_returns_no_module() -> None:
    fabric = Fabric(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(_returns_nothing))
    fabric.launch()
    try:
        with pytest.raises(TypeError, match=r"parallelize_fn='_returns_nothing'.*returned NoneType"):
            fabric.setup_module(nn.Linear(2, 2))
    finally:
        fabric.strategy.teardown()
