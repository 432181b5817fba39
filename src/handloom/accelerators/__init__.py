"""Accelerators with Lightning's API: ``from handloom.accelerators import CUDAAccelerator``.

``fabric.accelerator`` is one of these objects; ``Fabric(accelerator=...)`` takes a registry name
(``"cpu"``, ``"cuda"``, ``"gpu"``, ``"mps"``, ``"auto"``) or an instance.
"""

from __future__ import annotations

from handloom.accelerators.accelerator import Accelerator
from handloom.accelerators.cpu import CPUAccelerator
from handloom.accelerators.cuda import CUDAAccelerator, find_usable_cuda_devices
from handloom.accelerators.mps import MPSAccelerator
from handloom.accelerators.registry import _AcceleratorRegistry
from handloom.accelerators.xla import XLAAccelerator

__all__ = [
    "ACCELERATOR_REGISTRY",
    "Accelerator",
    "CPUAccelerator",
    "CUDAAccelerator",
    "MPSAccelerator",
    "XLAAccelerator",
    "find_usable_cuda_devices",
]

#: Lightning's deprecated name for :class:`XLAAccelerator` (which refuses: no TPU support).
TPUAccelerator = XLAAccelerator

ACCELERATOR_REGISTRY = _AcceleratorRegistry()
for _accelerator in (CPUAccelerator, CUDAAccelerator, MPSAccelerator, XLAAccelerator):
    _accelerator.register_accelerators(ACCELERATOR_REGISTRY)
del _accelerator
