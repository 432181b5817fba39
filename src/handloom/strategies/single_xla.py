"""``SingleDeviceXLAStrategy``: TPUs are not supported by handloom; the name exists for imports."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from handloom.accelerators.xla import xla_unsupported
from handloom.strategies.single_device import SingleDeviceStrategy

if TYPE_CHECKING:
    import torch

    from handloom.accelerators import Accelerator

__all__ = ["SingleDeviceXLAStrategy"]


class SingleDeviceXLAStrategy(SingleDeviceStrategy):
    """One TPU core in Lightning; creating one raises a RuntimeError here.

    Raises:
        RuntimeError: Always: use ``SingleDeviceStrategy`` on a CUDA device or the CPU.
    """

    def __init__(
        self,
        device: str | torch.device | int,
        accelerator: Accelerator | None = None,
        checkpoint_io: Any = None,
        precision: Any = None,
    ) -> None:
        raise xla_unsupported("SingleDeviceXLAStrategy()", "strategy=SingleDeviceStrategy(device='cuda:0')")
