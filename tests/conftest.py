"""Shared test hygiene: environment restored, no process group or thread leaks between tests."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _hygiene() -> Iterator[None]:
    env = dict(os.environ)
    threads = set(threading.enumerate())
    yield
    os.environ.clear()
    os.environ.update(env)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("the test left a torch.distributed process group behind")
    leaked = [t for t in threading.enumerate() if t not in threads and t.is_alive() and not t.daemon]
    assert not leaked, f"the test leaked threads: {leaked}"
