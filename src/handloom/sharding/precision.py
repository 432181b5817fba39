"""Precision under FSDP2: the precision choice becomes a ``MixedPrecisionPolicy``, not autocast."""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

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
