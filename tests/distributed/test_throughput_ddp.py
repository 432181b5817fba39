"""ThroughputMonitor and the progress bar across 2 forked processes on gloo."""

from __future__ import annotations

import io
from typing import Any

import pytest

from handloom import Fabric
from handloom.utilities import ThroughputMonitor, progress_bar

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


class RecordingLogger:
    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int | None]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((dict(metrics), step))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def save(self) -> None:
        pass

    def finalize(self, status: str = "success") -> None:
        pass


def _checks(fabric: Fabric) -> dict[str, Any]:
    rank = fabric.global_rank
    (logger,) = fabric.loggers
    monitor = ThroughputMonitor(fabric, window_size=3, available_flops=1e9)
    # Uneven ranks: rank 0 runs 4 samples (of 10 tokens) per 1 s step, rank 1 runs 8.
    per_step = 4 * (rank + 1)
    for step in range(1, 5):
        monitor.update(
            time=float(step),
            batches=step,
            samples=step * per_step,
            lengths=step * per_step * 10,
            flops=1e8 * per_step,
        )
    local = monitor.compute_and_log(step=4)
    synced = monitor.compute_and_log(step=5, sync=True)  # a collective: both ranks call it

    # The progress bar: drawn on rank 0 only, even when forced.
    out = io.StringIO()
    assert list(progress_bar(range(3), fabric, desc="ranked", enabled=True, file=out)) == [0, 1, 2]
    assert ("ranked" in out.getvalue()) == (rank == 0)

    if rank != 0:
        assert logger.logged == []  # only rank 0 logs
    assert local["device/samples_per_sec"] == per_step
    assert synced["device/samples_per_sec"] == per_step
    return {"local": local, "synced": synced, "logged": logger.logged}


def test_monitor_logs_on_rank_zero_and_sums_uneven_ranks_when_synced() -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_fork", loggers=[RecordingLogger()])
    result = fabric.launch(_checks)
    local, synced = result["local"], result["synced"]
    # Without sync the job's rate is rank 0's times the world size (Lightning's convention).
    assert local["device/samples_per_sec"] == 4.0
    assert local["samples_per_sec"] == 8.0
    assert local["device/mfu"] == pytest.approx(0.4)  # 4e8 FLOP/s against a 1e9 peak
    # With sync it is the sum of both ranks' own rates: 4 + 8 samples, 40 + 80 tokens per second.
    assert synced["samples_per_sec"] == 12.0
    assert synced["batches_per_sec"] == 2.0
    assert synced["items_per_sec"] == 120.0
    assert synced["flops_per_sec"] == pytest.approx(1.2e9)
    assert [step for _, step in result["logged"]] == [4, 5]
    assert result["logged"][1][0] == synced
