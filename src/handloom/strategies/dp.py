"""``torch.nn.DataParallel``: one process driving several CUDA devices."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from typing_extensions import override

from handloom.strategies.base import Strategy

if TYPE_CHECKING:
    from handloom.devices import AcceleratorName, HardwareProbe


class DataParallelStrategy(Strategy):
    """Split each batch across the node's CUDA devices with ``torch.nn.DataParallel``.

    Prefer ``strategy="ddp"``: PyTorch recommends DistributedDataParallel even on one machine.
    """

    name = "dp"
    wraps_forward = True

    def __init__(self) -> None:
        super().__init__()
        self.device_ids: list[int] = []

    @override
    def check_compatible(
        self, *, accelerator: AcceleratorName, world_size: int, probe: HardwareProbe
    ) -> None:
        if accelerator != "cuda":
            raise ValueError(
                f"Fabric(strategy='dp') needs CUDA devices, but the accelerator is {accelerator!r}."
                " Use strategy='ddp' to train with several processes on this machine."
            )
        self.device_ids = list(range(world_size))

    @override
    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return torch.nn.DataParallel(module, device_ids=self.device_ids or None)
