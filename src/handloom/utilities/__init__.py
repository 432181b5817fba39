"""Utilities around a training loop: throughput and MFU, FLOP counting, a rank-aware progress bar.

``from handloom.utilities import ThroughputMonitor`` replaces
``from lightning.fabric.utilities import ThroughputMonitor``. Optional packages (tqdm) are imported
only when used.
"""

from __future__ import annotations

from handloom.utilities.flops import get_available_flops, measure_flops
from handloom.utilities.progress import ProgressBar, progress_bar
from handloom.utilities.throughput import Throughput, ThroughputMonitor

__all__ = [
    "ProgressBar",
    "Throughput",
    "ThroughputMonitor",
    "get_available_flops",
    "measure_flops",
    "progress_bar",
]
