"""``lightning.fabric.utilities.device_dtype_mixin``: a mixin whose ``.device``/``.dtype`` follow ``.to()``.

Lightning defines no public names here; the mixin and its helper are offered because programs
(and LightningModule-style classes) use them. The implementation is :mod:`handloom.device_dtype`.
"""

from __future__ import annotations

from handloom.device_dtype import _DeviceDtypeModuleMixin, _update_properties

__all__ = ["_DeviceDtypeModuleMixin", "_update_properties"]
