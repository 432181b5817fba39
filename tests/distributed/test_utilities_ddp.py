"""``handloom.utilities`` on 2 forked gloo processes: rank_zero_only, shared filesystems, spike detection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from handloom import Fabric

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _checks(fabric: Fabric, tmp_path: Path) -> dict[str, Any]:
    from handloom.utilities import rank_zero_only
    from handloom.utilities.distributed import is_shared_filesystem
    from handloom.utilities.spike import SpikeDetection, TrainingSpikeException

    rank = fabric.global_rank

    @rank_zero_only
    def only_on_zero() -> int:
        return 7

    # rank_zero_only follows each launched process's global rank.
    seen = fabric.all_gather(torch.tensor([rank_zero_only.rank, only_on_zero() or -1]))

    # The same directory on one machine is shared; a different directory per rank is not.
    shared = is_shared_filesystem(fabric.strategy, tmp_path, timeout=60)  # waits only under heavy load
    own = tmp_path / f"rank{rank}"
    own.mkdir()
    per_rank = is_shared_filesystem(fabric.strategy, own)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))

    # A spike on rank 1 alone stops both ranks at the same batch.
    detector = SpikeDetection(window=2, warmup=1, exclude_batches_path=tmp_path / "skip.json")
    stopped_at = -1
    for index in range(5):
        loss = 100.0 if (rank == 1 and index == 3) else 1.0 / (index + 1)
        try:
            detector.on_train_batch_end(fabric, torch.tensor(loss), None, index)
        except TrainingSpikeException as spike:
            stopped_at = spike.batch_idx
            break
    stops = fabric.all_gather(torch.tensor(stopped_at))
    return {
        "seen": seen.tolist(),
        "shared": shared,
        "per_rank": per_rank,
        "leftovers": leftovers,
        "stops": stops.tolist(),
    }


def test_rank_zero_only_shared_filesystem_and_spikes_across_ranks(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_fork")
    result = fabric.launch(_checks, tmp_path)
    assert result["seen"] == [[0, 7], [1, -1]]
    assert result["shared"] is True and result["per_rank"] is False
    assert result["leftovers"] == []  # the probe file is removed
    assert result["stops"] == [3, 3]
    assert (tmp_path / "skip.json").read_text().split() == ["[", "2,", "3", "]"]
