"""Precision under FSDP2: the precision choice becomes a ``MixedPrecisionPolicy``, not autocast."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy
from typing_extensions import override

from handloom.amp import AmpRunner
from handloom.precision import PrecisionPolicy


def mixed_precision_policy(policy: PrecisionPolicy) -> MixedPrecisionPolicy:
    """FSDP2's policy for a precision choice.

    ``*-mixed``: parameters are all-gathered and used in the low dtype while the sharded master
    copy stays in fp32, and gradients are reduced in fp32. ``*-true``: the parameters were cast
    already, so nothing changes.
    """
    if policy.compute_dtype is not None:
        return MixedPrecisionPolicy(param_dtype=policy.compute_dtype, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


class ShardedAmpRunner(AmpRunner):
    """The precision runner of :class:`~handloom.strategies.FSDPStrategy`.

    For ``*-mixed`` the forward pass runs without autocast (FSDP2 casts the parameters) and its
    floating-point outputs come back in fp32; ``fabric.autocast()`` still gives autocast for code
    outside the model. fp16 uses ``torch.amp.GradScaler``, whose overflow check is reduced over the
    mesh for sharded (DTensor) gradients.
    """

    @override
    def wrap_forward(self, call: Callable[..., Any]) -> Callable[..., Any]:
        if self.policy.compute_dtype is None:
            return super().wrap_forward(call)

        def sharded_mixed_forward(*args: Any, **kwargs: Any) -> Any:
            return self.convert_output(call(*args, **kwargs))

        return sharded_mixed_forward
