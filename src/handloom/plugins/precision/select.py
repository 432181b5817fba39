"""The precision plugin a precision name stands for (``Fabric(precision="bf16-mixed")``)."""

from __future__ import annotations

from handloom.plugins.precision.amp import MixedPrecision
from handloom.plugins.precision.half import DoublePrecision, HalfPrecision
from handloom.plugins.precision.precision import Precision
from handloom.precision import PrecisionPolicy


def plugin_for(policy: PrecisionPolicy, device_type: str) -> Precision:
    """The plugin for a resolved precision on a device type (strategies without sharding)."""
    name = policy.name
    if name == "64-true":
        return DoublePrecision()
    if name in ("16-true", "bf16-true"):
        return HalfPrecision(name)
    if name in ("16-mixed", "bf16-mixed"):
        return MixedPrecision(name, device_type)
    return Precision()
