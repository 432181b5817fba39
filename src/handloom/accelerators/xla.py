"""TPUs through torch_xla: not supported by handloom. The names exist so imports keep working."""

from __future__ import annotations

from typing import Any, NoReturn

import torch
from typing_extensions import override

from handloom.accelerators.accelerator import Accelerator
from handloom.accelerators.registry import _AcceleratorRegistry

__all__ = ["XLAAccelerator"]


def xla_unsupported(
    what: str, instead: str = "Fabric(accelerator='cuda') or Fabric(accelerator='cpu')"
) -> RuntimeError:
    """The error every XLA name raises when used: ``what`` is the call made, ``instead`` the fix."""
    error = RuntimeError(
        f"{what} cannot run: handloom does not support TPUs or other XLA devices (torch_xla)."
        f" Train on CUDA GPUs or the CPU instead: {instead}."
    )
    error.given = what  # type: ignore[attr-defined]  # Fabric(strategy="xla") quotes the name
    return error


def _refuse(what: str) -> NoReturn:
    raise xla_unsupported(what)


class XLAAccelerator(Accelerator):
    """TPU accelerator: :meth:`is_available` is False, and creating one raises a RuntimeError."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _refuse("XLAAccelerator()")

    @override
    def setup_device(self, device: torch.device) -> None:
        _refuse("XLAAccelerator.setup_device()")

    @override
    def teardown(self) -> None:
        _refuse("XLAAccelerator.teardown()")

    @staticmethod
    @override
    def parse_devices(devices: Any) -> Any:
        """Raises a RuntimeError: XLA devices are not supported."""
        _refuse("XLAAccelerator.parse_devices()")

    @staticmethod
    @override
    def get_parallel_devices(devices: Any) -> Any:
        """Raises a RuntimeError: XLA devices are not supported."""
        _refuse("XLAAccelerator.get_parallel_devices()")

    @staticmethod
    @override
    def auto_device_count() -> int:
        """0: there are no XLA devices handloom can use."""
        return 0

    @staticmethod
    @override
    def is_available() -> bool:
        """False: handloom does not support XLA."""
        return False

    @staticmethod
    @override
    def name() -> str:
        """``"tpu"``."""
        return "tpu"

    @classmethod
    @override
    def register_accelerators(cls, accelerator_registry: _AcceleratorRegistry) -> None:
        """Register as ``"tpu"`` (building it raises the unsupported error)."""
        accelerator_registry.register(cls.name(), cls, description=cls.__name__)
