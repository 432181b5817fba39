"""One process on one device."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from typing_extensions import override

from handloom.strategies.base import Runtime, Strategy

if TYPE_CHECKING:
    from handloom.accelerators import Accelerator
    from handloom.plugins.io import CheckpointIO
    from handloom.plugins.precision import Precision


class SingleDeviceStrategy(Strategy):
    """Train in this process on one device.

    Works on its own too, as in Lightning: ``SingleDeviceStrategy(device="cpu")`` moves modules
    and batches (``module_to_device``, ``batch_to_device``) before any Fabric exists.

    Args:
        device: The device to use; by default the one Fabric selects (``"cpu"`` until then).
        accelerator: An :class:`~handloom.accelerators.Accelerator` (Lightning's argument).
        checkpoint_io: A ``CheckpointIO`` plugin (Lightning's argument).
        precision: A precision plugin (Lightning's argument).

    Example::

        fabric = Fabric(strategy=SingleDeviceStrategy(device="cuda:1"))
    """

    name = "single_device"

    def __init__(
        self,
        device: str | torch.device | int | None = None,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
    ) -> None:
        super().__init__(accelerator=accelerator, checkpoint_io=checkpoint_io, precision=precision)
        self._device = torch.device(device) if device is not None else None

    @property
    def device(self) -> torch.device | None:
        """The device given to the constructor (``None``: the one Fabric selects)."""
        return self._device

    @property
    @override
    def root_device(self) -> torch.device:
        """This process's device: the one given, else Fabric's (the CPU before a Fabric uses it)."""
        if self._runtime is not None:
            return self._runtime.device
        return self._device if self._device is not None else torch.device("cpu")

    @override
    def bind(self, runtime: Runtime) -> None:
        if self._device is not None and self._device != runtime.device:
            runtime = dataclasses.replace(runtime, device=self._device)
        super().bind(runtime)
