"""Lightning-compatible plugins: precision, cluster environments, checkpoint I/O and collectives.

``from handloom.plugins import BitsandbytesPrecision`` replaces
``from lightning.fabric.plugins import BitsandbytesPrecision``. Each name is a re-export of the one
implementation in its subpackage; the subpackages load on first use, so ``import handloom`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from handloom.plugins.environments import ClusterEnvironment
    from handloom.plugins.io import CheckpointIO, TorchCheckpointIO, XLACheckpointIO
    from handloom.plugins.precision import (
        BitsandbytesPrecision,
        DeepSpeedPrecision,
        DoublePrecision,
        FSDPPrecision,
        HalfPrecision,
        MixedPrecision,
        Precision,
        TransformerEnginePrecision,
        XLAPrecision,
    )

__all__ = [
    "BitsandbytesPrecision",
    "CheckpointIO",
    "ClusterEnvironment",
    "DeepSpeedPrecision",
    "DoublePrecision",
    "FSDPPrecision",
    "HalfPrecision",
    "MixedPrecision",
    "Precision",
    "TorchCheckpointIO",
    "TransformerEnginePrecision",
    "XLACheckpointIO",
    "XLAPrecision",
]

_SUBPACKAGE = {
    "ClusterEnvironment": "handloom.plugins.environments",
    "CheckpointIO": "handloom.plugins.io",
    "TorchCheckpointIO": "handloom.plugins.io",
    "XLACheckpointIO": "handloom.plugins.io",
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'handloom.plugins' has no attribute {name!r}")
    module = importlib.import_module(_SUBPACKAGE.get(name, "handloom.plugins.precision"))
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
