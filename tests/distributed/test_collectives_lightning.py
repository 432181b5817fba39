"""Collectives and backward as Lightning Fabric runs them, on real gloo process groups (2 forked processes).

What programs written for Lightning rely on: ``fabric.all_reduce(loss)`` updates ``loss`` itself
(litgpt ignores the return value), numbers inside a collection are reduced like tensors, and a
loss from a model that ``fabric.setup`` never saw does not train each rank on its own in silence.
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


def _numbers_and_arrays(fabric: Fabric) -> None:
    import numpy as np

    rank = fabric.global_rank
    totals = fabric.all_reduce(
        {"loss_sum": torch.tensor(2.0 * (rank + 1)), "num_samples": 5 + rank, "seen": [rank == 1, 0.5]},
        reduce_op="sum",
    )
    assert totals["loss_sum"].item() == 6.0
    count = totals["num_samples"]
    assert isinstance(count, torch.Tensor) and count.dtype == torch.int32 and count.item() == 11
    flag, half = totals["seen"]
    assert flag.dtype == torch.uint8 and flag.item() == 1  # bool travels as uint8, as in Lightning
    assert half.dtype == torch.float32 and half.item() == 1.0
    array = np.array([rank, 10.0 * rank])
    summed = fabric.all_reduce({"array": array}, reduce_op="sum")["array"]
    assert summed.dtype == torch.float64 and summed.tolist() == [1.0, 10.0]
    assert fabric.all_reduce(3 * (rank + 1), reduce_op="max").item() == 6
    assert fabric.all_gather({"n": 3 + rank})["n"].tolist() == [3, 4]
    gathered = fabric.all_gather([np.array([rank, rank])])[0]
    assert gathered.tolist() == [[0, 0], [1, 1]]


def _in_place(fabric: Fabric) -> None:
    rank = fabric.global_rank
    expected = {"mean": [1.5, 15.0], "sum": [3.0, 30.0], "max": [2.0, 20.0], "min": [1.0, 10.0],
                "product": [2.0, 200.0]}  # fmt: skip
    for op, result in expected.items():
        value = torch.tensor([1.0, 10.0]) * (rank + 1)
        assert fabric.all_reduce(value, reduce_op=op) is value, op
        assert value.tolist() == result, op
    # The litgpt pattern: the return value is ignored, the logged loss must be the mean.
    val_loss = torch.tensor(float(rank + 1))
    fabric.all_reduce(val_loss)
    assert val_loss.item() == 1.5
    # An integer mean keeps the dtype and truncates toward zero, as torch's copy_ of the division does.
    counts = torch.tensor([3, -3]) + torch.tensor([1, -1]) * rank
    assert fabric.all_reduce(counts) is counts
    assert counts.dtype == torch.int64 and counts.tolist() == [3, -3]
    # Not contiguous: reduced through a copy, written back into the user's tensor.
    base = torch.arange(6.0).reshape(2, 3)
    view = (base * (rank + 1)).t()
    assert not view.is_contiguous()
    assert fabric.all_reduce(view, reduce_op="sum") is view
    assert torch.equal(view, base.t() * 3)
    inside = {"a": torch.tensor(float(rank)), "b": [torch.tensor(2.0 * rank)]}
    out = fabric.all_reduce(inside, reduce_op="sum")
    assert out["a"] is inside["a"] and inside["a"].item() == 1.0 and inside["b"][0].item() == 2.0


def _backward_needs_setup(fabric: Fabric) -> None:
    weight = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"no model was set up with this Fabric.*fabric\.setup\(model"):
        fabric.backward((weight * 2).sum())
    assert weight.grad is None  # refused before any gradient was computed
    torch.manual_seed(0)
    model = fabric.setup(nn.Linear(3, 1))
    fabric.backward(model(torch.full((2, 3), float(fabric.global_rank))).sum())
    grad = model.weight.grad
    grads = fabric.all_gather(grad.full_tensor() if isinstance(grad, DTensor) else grad)
    assert torch.equal(grads[0], grads[1])  # synchronised


def _ddp_checks(fabric: Fabric) -> str:
    _backward_needs_setup(fabric)  # first: no model may be set up before it
    _numbers_and_arrays(fabric)
    _in_place(fabric)
    return "ok"


def test_ddp_collectives_are_in_place_and_convert_numbers_and_backward_needs_setup() -> None:
    pytest.importorskip("numpy")
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_fork")
    assert fabric.launch(_ddp_checks) == "ok"


def _fsdp_checks(fabric: Fabric) -> str:
    _backward_needs_setup(fabric)
    rank = fabric.global_rank
    val_loss = torch.tensor(float(rank + 1))
    fabric.all_reduce(val_loss)
    assert val_loss.item() == 1.5
    counts = torch.tensor([3, -3]) + torch.tensor([1, -1]) * rank
    fabric.all_reduce(counts)
    assert counts.tolist() == [3, -3]
    totals: dict[str, Any] = fabric.all_reduce({"n": 1 + rank}, reduce_op="sum")
    assert totals["n"].item() == 3
    return "ok"


def test_fsdp_collectives_are_in_place_and_backward_needs_setup() -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy=FSDPStrategy(start_method="fork"))
    assert fabric.launch(_fsdp_checks) == "ok"
