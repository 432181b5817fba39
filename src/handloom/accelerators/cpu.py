"""The CPU accelerator."""

from __future__ import annotations

import torch
from typing_extensions import override

from handloom.accelerators.accelerator import Accelerator
from handloom.accelerators.registry import _AcceleratorRegistry
from handloom.devices import HardwareProbe, parse_devices

__all__ = ["CPUAccelerator"]


class CPUAccelerator(Accelerator):
    """Run on the CPU: ``devices=n`` means ``n`` processes."""

    @override
    def setup_device(self, device: torch.device) -> None:
        """Check that ``device`` is a CPU device.

        Raises:
            ValueError: ``device`` is not a CPU device.
        """
        if device.type != "cpu":
            raise ValueError(
                f"CPUAccelerator.setup_device({str(device)!r}) got a {device.type} device."
                " Pass torch.device('cpu'), or use the accelerator of that device."
            )

    @override
    def teardown(self) -> None:
        """Nothing to release."""

    @staticmethod
    @override
    def parse_devices(devices: int | str) -> int:
        """The number of processes ``devices`` asks for (an int > 0 or a digit string).

        Raises:
            ValueError: zero, a negative count, or a list of indices.
            TypeError: a value of another type.
        """
        return len(parse_devices(devices, "cpu", HardwareProbe()))

    @staticmethod
    @override
    def get_parallel_devices(devices: int | str) -> list[torch.device]:
        """One ``torch.device("cpu")`` per process."""
        return [torch.device("cpu")] * CPUAccelerator.parse_devices(devices)

    @staticmethod
    @override
    def auto_device_count() -> int:
        """One process."""
        return 1

    @staticmethod
    @override
    def is_available() -> bool:
        """Always True."""
        return True

    @staticmethod
    @override
    def name() -> str:
        """``"cpu"``."""
        return "cpu"

    @classmethod
    @override
    def register_accelerators(cls, accelerator_registry: _AcceleratorRegistry) -> None:
        """Register as ``"cpu"``."""
        accelerator_registry.register(cls.name(), cls, description=cls.__name__)
