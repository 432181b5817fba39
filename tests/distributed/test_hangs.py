"""Collectives that not every rank reaches end within the timeout, with an error naming them.

Two forked gloo processes per test, with a 2 s collective timeout so a regression fails fast
instead of hanging for the default 10 minutes.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Any

import pytest
import torch

from handloom import Fabric
from handloom.launcher import WorkerFailedError
from handloom.strategies import DDPStrategy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

TIMEOUT = timedelta(seconds=2)
# Ranks that skip the collective stay busy this long, well past TIMEOUT, then return normally.
BUSY_S = 8.0


def _fabric(check_collectives: bool = False) -> Fabric:
    strategy = DDPStrategy(start_method="fork", timeout=TIMEOUT, check_collectives=check_collectives)
    return Fabric(accelerator="cpu", devices=2, strategy=strategy)


def _all_reduce_on_rank_zero_only(fabric: Fabric) -> None:
    if fabric.is_global_zero:
        fabric.all_reduce(torch.ones(3))  # the classic mistake: a collective under is_global_zero
    else:
        time.sleep(BUSY_S)


def _mismatched_collectives(fabric: Fabric) -> None:
    if fabric.is_global_zero:
        fabric.all_reduce(torch.ones(3))
    else:
        fabric.barrier()


def _differently_named_barriers(fabric: Fabric) -> None:
    fabric.barrier("same everywhere")  # passes
    fabric.barrier(f"step-{fabric.global_rank}")


def _failure(fn: Any, check_collectives: bool = False) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(WorkerFailedError) as info:
        _fabric(check_collectives).launch(fn)
    return str(info.value), time.monotonic() - start


def test_a_collective_on_rank_zero_only_fails_within_the_timeout_naming_it() -> None:
    message, elapsed = _failure(_all_reduce_on_rank_zero_only)
    assert "Rank 0 failed first" in message
    assert "fabric.all_reduce on rank 0 timed out" in message
    assert "collective timeout: 2 s" in message
    assert "if fabric.is_global_zero:" in message and "--check-collectives" in message
    assert elapsed < BUSY_S  # ended by the timeout, not by the busy rank returning


def test_collective_checks_name_the_ranks_that_did_not_arrive() -> None:
    message, elapsed = _failure(_all_reduce_on_rank_zero_only, check_collectives=True)
    assert "fabric.all_reduce on rank 0 timed out" in message
    assert "rank(s) [1] did not reach it" in message
    assert elapsed < BUSY_S


def test_collective_checks_catch_different_collectives_at_once() -> None:
    message, elapsed = _failure(_mismatched_collectives, check_collectives=True)
    # Either rank may notice first; each names both calls.
    assert re.search(
        r"fabric\.all_reduce on rank 0 \(ALLREDUCE, this rank's collective #\d+\) does not match"
        r"|fabric\.barrier\(\) on rank 1 \(BARRIER, this rank's collective #\d+\) does not match",
        message,
    )
    assert elapsed < TIMEOUT.total_seconds() + 10  # start-up included; no waiting for the timeout


def test_barriers_with_different_names_fail_naming_each_rank() -> None:
    message, _ = _failure(_differently_named_barriers)
    assert "fabric.barrier('step-" in message
    assert "rank 0: 'step-0', rank 1: 'step-1'" in message
