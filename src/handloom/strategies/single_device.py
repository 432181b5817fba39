"""One process on one device."""

from __future__ import annotations

import torch
from typing_extensions import override

from handloom.strategies.base import Runtime, Strategy


class SingleDeviceStrategy(Strategy):
    """Train in this process on one device.

    Args:
        device: The device to use; by default the one Fabric selected.

    Example::

        fabric = Fabric(strategy=SingleDeviceStrategy(device="cuda:1"))
    """

    name = "single_device"

    def __init__(self, device: str | torch.device | int | None = None) -> None:
        super().__init__()
        self._device = torch.device(device) if device is not None else None

    @override
    def bind(self, runtime: Runtime) -> None:
        if self._device is not None and self._device != runtime.device:
            runtime = Runtime(runtime.accelerator, self._device, runtime.topology, runtime.num_nodes,
                              runtime.precision)  # fmt: skip
        super().bind(runtime)
