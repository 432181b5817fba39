"""Loggers under DDP (2 forked processes): one version directory, one set of rows, agreed by all ranks."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from handloom import Fabric
from handloom.loggers import CSVLogger, TensorBoardLogger

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _log_on_every_rank(fabric: Fabric) -> dict[str, Any]:
    csv_logger, tb_logger = fabric.loggers
    rank = fabric.global_rank
    # The race that makes independently computed versions diverge: rank 0 creates its directories
    # before rank 1 looks at the disk.
    if rank == 0:
        _ = csv_logger.log_dir, tb_logger.experiment
    fabric.barrier()
    versions = torch.tensor([csv_logger.version, tb_logger.version])
    gathered = fabric.all_gather(versions)
    for step in range(5):
        # Each rank logs its own values: only rank 0's may reach the files.
        fabric.log_dict({"loss": torch.tensor(step + 100.0 * rank), "rank": rank}, step=step)
    csv_logger.log_hyperparams({"lr": 0.1})
    tb_logger.log_hyperparams({"lr": 0.1})
    fabric.barrier()
    # No finalize: the worker's end writes the buffered rows (flush_logs_every_n_steps=100).
    return {
        "agree": bool((gathered == gathered[0]).all()),
        "versions": versions.tolist(),
        "log_dirs": (csv_logger.log_dir, tb_logger.log_dir),
    }


def test_rank_zero_writes_one_version_that_every_rank_agrees_on(tmp_path: Path) -> None:
    (tmp_path / "csv" / "version_0").mkdir(parents=True)  # an earlier run
    loggers = [
        CSVLogger(tmp_path, name="csv", flush_logs_every_n_steps=100),
        TensorBoardLogger(tmp_path, name="tb"),
    ]
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_fork", loggers=loggers)
    result = fabric.launch(_log_on_every_rank)
    assert result["agree"] and result["versions"] == [1, 0]
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["version_0", "version_1"]
    assert [p.name for p in (tmp_path / "tb").iterdir()] == ["version_0"]
    csv_dir, tb_dir = result["log_dirs"]
    with open(Path(csv_dir) / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["step"], r["loss"], r["rank"]) for r in rows] == [(str(s), f"{s}.0", "0") for s in range(5)]
    assert (Path(csv_dir) / "hparams.json").read_text().strip() == '{\n  "lr": 0.1\n}'
    acc = EventAccumulator(tb_dir)
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(s, float(s)) for s in range(5)]
    assert {e.value for e in acc.Scalars("rank")} == {0.0}
    assert "hparams" in acc.Tags()["tensors"] or acc.PluginTagToContent("hparams")
    # The launching process logged nothing and resolved no version of its own.
    assert all(logger._rows == [] for logger in loggers)
