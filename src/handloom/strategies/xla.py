"""``XLAStrategy``: TPUs are not supported by handloom; the name exists so imports keep working."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from handloom.accelerators.xla import xla_unsupported
from handloom.strategies.parallel import ParallelStrategy

if TYPE_CHECKING:
    import torch

    from handloom.accelerators import Accelerator

__all__ = ["XLAStrategy"]


class XLAStrategy(ParallelStrategy):
    """Data parallel training on TPUs in Lightning; creating one raises a RuntimeError here.

    Raises:
        RuntimeError: Always: use ``DDPStrategy`` on CUDA or the CPU.
    """

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        checkpoint_io: Any = None,
        precision: Any = None,
        sync_module_states: bool = True,
    ) -> None:
        raise xla_unsupported("XLAStrategy()", "strategy=DDPStrategy() or strategy='ddp'")
