"""Checkpoint I/O plugins, as ``lightning.fabric.plugins.io``: how single-file checkpoints are stored."""

from __future__ import annotations

from handloom.plugins.io.checkpoint_io import CheckpointIO
from handloom.plugins.io.torch_io import TorchCheckpointIO
from handloom.plugins.io.xla import XLACheckpointIO

__all__ = ["CheckpointIO", "TorchCheckpointIO", "XLACheckpointIO"]
