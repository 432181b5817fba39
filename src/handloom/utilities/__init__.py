"""Utilities around a training loop, at Lightning's paths.

``lightning.fabric.utilities.X`` is ``handloom.utilities.X``.

``from handloom.utilities import ThroughputMonitor, rank_zero_only, AttributeDict`` replaces the
same import from ``lightning.fabric.utilities``; each submodule (``seed``, ``rank_zero``,
``distributed``, ``throughput``, ...) mirrors Lightning's module of that name. Names load on first
use, and optional packages (tqdm, fsspec, tensorboard) only when a function needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from handloom.utilities.apply_func import move_data_to_device
    from handloom.utilities.data import AttributeDict, suggested_max_num_workers
    from handloom.utilities.distributed import is_shared_filesystem
    from handloom.utilities.enums import LightningEnum
    from handloom.utilities.flops import get_available_flops, measure_flops
    from handloom.utilities.progress import ProgressBar, progress_bar
    from handloom.utilities.rank_zero import (
        rank_zero_deprecation,
        rank_zero_info,
        rank_zero_only,
        rank_zero_warn,
    )
    from handloom.utilities.throughput import Throughput, ThroughputMonitor
    from handloom.utilities.warnings import disable_possible_user_warnings

__all__ = [
    "AttributeDict",
    "LightningEnum",
    "ProgressBar",
    "Throughput",
    "ThroughputMonitor",
    "disable_possible_user_warnings",
    "get_available_flops",
    "is_shared_filesystem",
    "measure_flops",
    "move_data_to_device",
    "progress_bar",
    "rank_zero_deprecation",
    "rank_zero_info",
    "rank_zero_only",
    "rank_zero_warn",
    "suggested_max_num_workers",
]

_LAZY = {
    "AttributeDict": "handloom.utilities.data",
    "LightningEnum": "handloom.utilities.enums",
    "ProgressBar": "handloom.utilities.progress",
    "Throughput": "handloom.utilities.throughput",
    "ThroughputMonitor": "handloom.utilities.throughput",
    "disable_possible_user_warnings": "handloom.utilities.warnings",
    "get_available_flops": "handloom.utilities.flops",
    "is_shared_filesystem": "handloom.utilities.distributed",
    "measure_flops": "handloom.utilities.flops",
    "move_data_to_device": "handloom.utilities.apply_func",
    "progress_bar": "handloom.utilities.progress",
    "rank_zero_deprecation": "handloom.utilities.rank_zero",
    "rank_zero_info": "handloom.utilities.rank_zero",
    "rank_zero_only": "handloom.utilities.rank_zero",
    "rank_zero_warn": "handloom.utilities.rank_zero",
    "suggested_max_num_workers": "handloom.utilities.data",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'handloom.utilities' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
