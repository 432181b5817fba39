"""The Apple-silicon (MPS) accelerator."""

from __future__ import annotations

import torch
from typing_extensions import override

from handloom.accelerators.accelerator import Accelerator
from handloom.accelerators.registry import _AcceleratorRegistry
from handloom.devices import HardwareProbe, parse_devices, probe_hardware

__all__ = ["MPSAccelerator"]


class MPSAccelerator(Accelerator):
    """Run on Apple's Metal (MPS) device; there is one, so only one process."""

    @override
    def setup_device(self, device: torch.device) -> None:
        """Check that ``device`` is the MPS device.

        Raises:
            ValueError: ``device`` is not an MPS device.
        """
        if device.type != "mps":
            raise ValueError(
                f"MPSAccelerator.setup_device({str(device)!r}) got a {device.type} device."
                " Pass torch.device('mps'), or use the accelerator of that device."
            )

    @override
    def teardown(self) -> None:
        """Nothing to release."""

    @staticmethod
    @override
    def parse_devices(devices: int | str | list[int]) -> list[int]:
        """The device indices ``devices`` selects (only index 0 exists).

        Raises:
            ValueError: zero devices, more than one, or an index other than 0.
        """
        return parse_devices(devices, "mps", HardwareProbe(mps_available=True))

    @staticmethod
    @override
    def get_parallel_devices(devices: int | str | list[int]) -> list[torch.device]:
        """The ``torch.device("mps", i)`` objects for ``devices``."""
        return [torch.device("mps", i) for i in range(len(MPSAccelerator.parse_devices(devices)))]

    @staticmethod
    @override
    def auto_device_count() -> int:
        """One device."""
        return 1

    @staticmethod
    @override
    def is_available() -> bool:
        """True when PyTorch's MPS backend is available."""
        return probe_hardware().mps_available

    @staticmethod
    @override
    def name() -> str:
        """``"mps"``."""
        return "mps"

    @classmethod
    @override
    def register_accelerators(cls, accelerator_registry: _AcceleratorRegistry) -> None:
        """Register as ``"mps"``."""
        accelerator_registry.register(cls.name(), cls, description=cls.__name__)
