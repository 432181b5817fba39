"""Lightning's ``plugins.precision.utils`` path: the dtype helpers precision plugins are built from.

Lightning's names here are private; the two that plugin authors use are offered over handloom's
helpers in :mod:`handloom.amp`.
"""

from __future__ import annotations

from handloom.amp import cast_floating as _convert_fp_tensor
from handloom.amp import default_dtype as _DtypeContextManager

__all__ = ["_DtypeContextManager", "_convert_fp_tensor"]
