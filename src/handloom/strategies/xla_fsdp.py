"""``XLAFSDPStrategy``: TPUs are not supported by handloom; the name exists so imports keep working."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from handloom.accelerators.xla import xla_unsupported
from handloom.strategies.parallel import ParallelStrategy

if TYPE_CHECKING:
    import torch

    from handloom.accelerators import Accelerator

__all__ = ["XLAFSDPStrategy"]


class XLAFSDPStrategy(ParallelStrategy):
    """Fully sharded training on TPUs in Lightning; creating one raises a RuntimeError here.

    Raises:
        RuntimeError: Always: use ``FSDPStrategy`` on CUDA or the CPU.
    """

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        checkpoint_io: Any = None,
        precision: Any = None,
        auto_wrap_policy: Any = None,
        activation_checkpointing_policy: Any = None,
        state_dict_type: Literal["full", "sharded"] = "sharded",
        sequential_save: bool = False,
        **kwargs: Any,
    ) -> None:
        raise xla_unsupported("XLAFSDPStrategy()", "strategy=FSDPStrategy() or strategy='fsdp'")
