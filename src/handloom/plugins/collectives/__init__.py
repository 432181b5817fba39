"""Collectives that own a process group, as ``lightning.fabric.plugins.collectives`` (experimental there)."""

from __future__ import annotations

from handloom.plugins.collectives.collective import Collective
from handloom.plugins.collectives.single_device import SingleDeviceCollective
from handloom.plugins.collectives.torch_collective import TorchCollective

__all__ = ["Collective", "SingleDeviceCollective", "TorchCollective"]
