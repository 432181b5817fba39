"""A LightningModule set up by handloom's Fabric gets the Fabric, as under Lightning: its ``self.log``,
``self.logger`` and ``self.optimizers()`` work and its hooks are called like a callback's."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch

from handloom import Fabric
from handloom.loggers import CSVLogger

lightning_pytorch = pytest.importorskip("lightning.pytorch")


class Classifier(lightning_pytorch.LightningModule):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        self.hooked: list[str] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_epoch_end(self) -> None:
        self.hooked.append("on_train_epoch_end")


def test_a_lightning_module_logs_through_the_fabric_that_set_it_up(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="run", version=0)
    fabric = Fabric(accelerator="cpu", devices=1, loggers=logger)
    module = Classifier()
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    assert module._fabric is fabric
    assert module.logger is logger
    assert module.optimizers() is optimizer
    batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    loss = model.training_step(batch, 0)
    fabric.backward(loss)
    optimizer.step()
    fabric.call("on_train_epoch_end")
    assert module.hooked == ["on_train_epoch_end"]
    logger.finalize("success")
    rows = list(csv.DictReader((Path(logger.log_dir) / "metrics.csv").read_text().splitlines()))
    assert float(rows[0]["train_loss"]) == pytest.approx(loss.item())


def test_setup_module_attaches_too_and_is_not_an_after_setup_event() -> None:
    seen: list[str] = []

    class Callback:
        def on_after_setup(self, fabric: Fabric, module: Any) -> None:
            seen.append("on_after_setup")

    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[Callback()])
    module = Classifier()
    fabric.setup_module(module)
    assert module._fabric is fabric and module.loggers == []
    assert seen == []  # Lightning fires on_after_setup from setup() only
