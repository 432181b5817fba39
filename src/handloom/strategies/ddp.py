"""Data parallel training with ``torch.nn.parallel.DistributedDataParallel``."""

from __future__ import annotations

from contextlib import AbstractContextManager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from handloom.strategies.base import Strategy
from handloom.strategies.parallel import DEFAULT_SAVE_TIMEOUT, DEFAULT_TIMEOUT, ParallelStrategy

if TYPE_CHECKING:
    from handloom.accelerators import Accelerator
    from handloom.environments import ClusterEnvironment
    from handloom.plugins.io import CheckpointIO
    from handloom.plugins.precision import Precision

__all__ = ["DEFAULT_TIMEOUT", "DDPStrategy"]


class DDPStrategy(ParallelStrategy):
    """One process per device; gradients are averaged by ``DistributedDataParallel``.

    Args:
        accelerator: An :class:`~handloom.accelerators.Accelerator` (Lightning's argument).
        parallel_devices: The devices of this node's processes (Lightning's argument); they fix the
            accelerator and the process count.
        cluster_environment: The cluster environment to use instead of auto-detection.
        checkpoint_io: A ``CheckpointIO`` plugin (Lightning's argument).
        precision: A precision plugin (Lightning's argument).
        process_group_backend: ``"gloo"``, ``"nccl"``, ... Defaults to NCCL on CUDA, gloo otherwise.
        timeout: How long a collective may wait for the other ranks (default 10 minutes).
        start_method: ``"popen"`` re-runs the script per process (``strategy="ddp"``);
            ``"spawn"``, ``"fork"`` and ``"forkserver"`` start ``fabric.launch(fn)`` in new processes.
        check_collectives: Check every collective across ranks (torch's ``DETAIL`` debug level):
            a collective some ranks never reach fails naming them, one that differs between ranks
            fails at once. Costs an extra round trip per collective; for debugging hangs.
        save_timeout: How long ``fabric.save`` waits for every rank to call it (it is collective
            here, as in Lightning) before it raises naming the ranks that did not (default 15 s).
        **ddp_kwargs: Passed to ``DistributedDataParallel`` (``find_unused_parameters``,
            ``static_graph``, ``gradient_as_bucket_view``, ``bucket_cap_mb``, ...).

    Example::

        fabric = Fabric(devices=4, strategy=DDPStrategy(static_graph=True))
    """

    name = "ddp"
    wraps_forward = True

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = DEFAULT_TIMEOUT,
        start_method: str = "popen",
        check_collectives: bool = False,
        save_timeout: timedelta = DEFAULT_SAVE_TIMEOUT,
        **ddp_kwargs: Any,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=precision,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            check_collectives=check_collectives,
            save_timeout=save_timeout,
        )
        _check_ddp_kwargs(ddp_kwargs)
        self.ddp_kwargs = ddp_kwargs

    @override
    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.root_device.index] if self.root_device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, **self.ddp_kwargs)

    @override
    def no_backward_sync(self, module: torch.nn.Module, enabled: bool) -> AbstractContextManager[Any]:
        from torch.nn.parallel import DistributedDataParallel

        if not enabled or not isinstance(module, DistributedDataParallel):
            return Strategy.no_backward_sync(self, module, enabled)
        return module.no_sync()


# Set by DDPStrategy itself from the device it runs on.
_MANAGED_DDP_OPTIONS = frozenset({"self", "module", "device_ids", "output_device"})


def _check_ddp_kwargs(ddp_kwargs: dict[str, Any]) -> None:
    """Reject keywords ``DistributedDataParallel`` does not take now, not inside the launched job.

    Raises:
        TypeError: A keyword that is neither DDPStrategy's nor DistributedDataParallel's.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    accepted = set(inspect.signature(DistributedDataParallel.__init__).parameters) - _MANAGED_DDP_OPTIONS
    unknown = sorted(set(ddp_kwargs) - accepted)
    if unknown:
        raise TypeError(
            f"DDPStrategy({unknown[0]}=...) is not an option of DDPStrategy or of DistributedDataParallel."
            f" DistributedDataParallel takes: {', '.join(sorted(accepted))}."
        )
