"""``torch.nn.DataParallel``: one process driving several CUDA devices."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from handloom.strategies.base import Strategy

if TYPE_CHECKING:
    from handloom.accelerators import Accelerator
    from handloom.devices import AcceleratorName, HardwareProbe
    from handloom.plugins.io import CheckpointIO
    from handloom.plugins.precision import Precision


class DataParallelStrategy(Strategy):
    """Split each batch across the node's CUDA devices with ``torch.nn.DataParallel``.

    Prefer ``strategy="ddp"``: PyTorch recommends DistributedDataParallel even on one machine.

    Args:
        accelerator: An :class:`~handloom.accelerators.Accelerator` (Lightning's argument).
        parallel_devices: The CUDA devices to split batches over (Lightning's argument); by
            default those ``Fabric(devices=...)`` selects.
        checkpoint_io: A ``CheckpointIO`` plugin (Lightning's argument).
        precision: A precision plugin (Lightning's argument).
    """

    name = "dp"
    wraps_forward = True

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
    ) -> None:
        super().__init__(accelerator=accelerator, checkpoint_io=checkpoint_io, precision=precision)
        from handloom.strategies.parallel import _check_parallel_devices

        self.parallel_devices = _check_parallel_devices(parallel_devices, type(self).__name__)
        self.device_ids: list[int] = [d.index or 0 for d in self.parallel_devices or []]

    @override
    def check_compatible(
        self, *, accelerator: AcceleratorName, world_size: int, probe: HardwareProbe
    ) -> None:
        if accelerator != "cuda":
            raise ValueError(
                f"Fabric(strategy='dp') needs CUDA devices, but the accelerator is {accelerator!r}."
                " Use strategy='ddp' to train with several processes on this machine."
            )
        if not self.device_ids:
            self.device_ids = list(range(world_size))

    @property
    @override
    def root_device(self) -> torch.device:
        """The first device (DataParallel gathers outputs there)."""
        if self._runtime is None and self.parallel_devices:
            return self.parallel_devices[0]
        return super().root_device

    @override
    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return torch.nn.DataParallel(module, device_ids=self.device_ids or None)

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None) -> Any:
        """Return ``batch`` unchanged: DataParallel scatters it to the devices itself."""
        return batch
