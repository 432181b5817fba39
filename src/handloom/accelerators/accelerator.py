"""The accelerator interface: one kind of hardware, how its devices are counted, parsed and prepared."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from handloom.accelerators.registry import _AcceleratorRegistry


class Accelerator(ABC):
    """Base class of accelerators, with Lightning's interface.

    ``Fabric(accelerator=...)`` takes a name or an instance; ``fabric.accelerator`` returns the
    instance in use. A subclass written for Lightning works too: its ``parse_devices`` and
    ``get_parallel_devices`` choose the devices (which must be ``cpu``, ``cuda`` or ``mps``
    devices) and its ``setup_device`` runs in each process before any communication.
    """

    @abstractmethod
    def setup_device(self, device: torch.device) -> None:
        """Prepare ``device`` for this process (e.g. make it the current CUDA device)."""

    @abstractmethod
    def teardown(self) -> None:
        """Release what the accelerator holds."""

    @staticmethod
    @abstractmethod
    def parse_devices(devices: Any) -> Any:
        """Turn the ``devices`` argument into this accelerator's device selection."""

    @staticmethod
    @abstractmethod
    def get_parallel_devices(devices: Any) -> Any:
        """The ``torch.device`` objects for a selection made by :meth:`parse_devices`."""

    @staticmethod
    @abstractmethod
    def auto_device_count() -> int:
        """How many devices ``devices="auto"`` means."""

    @staticmethod
    @abstractmethod
    def is_available() -> bool:
        """True when this hardware can be used on this machine."""

    @staticmethod
    @abstractmethod
    def name() -> str:
        """The registry name, e.g. ``"cpu"``."""

    @classmethod  # noqa: B027  (an optional hook: a no-op unless a subclass registers itself)
    def register_accelerators(cls, accelerator_registry: _AcceleratorRegistry) -> None:
        """Add this accelerator to ``accelerator_registry`` (subclasses register their name)."""
