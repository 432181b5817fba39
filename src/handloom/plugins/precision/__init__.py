"""Precision plugins with Lightning's protocol: ``from handloom.plugins.precision import MixedPrecision``.

``Fabric(precision="bf16-mixed")`` builds the matching plugin; ``Fabric(plugins=[plugin])`` or
``Fabric(precision=plugin)`` takes one you made, a subclass of :class:`Precision` included.
``fabric.strategy.precision`` is the plugin in use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from handloom.plugins.precision.amp import MixedPrecision
from handloom.plugins.precision.fsdp import FSDPPrecision
from handloom.plugins.precision.half import DoublePrecision, HalfPrecision
from handloom.plugins.precision.precision import Precision

if TYPE_CHECKING:
    from handloom.plugins.precision.bitsandbytes import BitsandbytesPrecision
    from handloom.plugins.precision.deepspeed import DeepSpeedPrecision
    from handloom.plugins.precision.transformer_engine import TransformerEnginePrecision
    from handloom.plugins.precision.xla import XLAPrecision

__all__ = [
    "BitsandbytesPrecision",
    "DeepSpeedPrecision",
    "DoublePrecision",
    "FSDPPrecision",
    "HalfPrecision",
    "MixedPrecision",
    "Precision",
    "TransformerEnginePrecision",
    "XLAPrecision",
]

_LAZY = {
    "BitsandbytesPrecision": "handloom.plugins.precision.bitsandbytes",
    "DeepSpeedPrecision": "handloom.plugins.precision.deepspeed",
    "TransformerEnginePrecision": "handloom.plugins.precision.transformer_engine",
    "XLAPrecision": "handloom.plugins.precision.xla",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'handloom.plugins.precision' has no attribute {name!r}")
