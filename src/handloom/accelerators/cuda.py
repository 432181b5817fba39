"""The NVIDIA CUDA accelerator, and a helper that finds GPUs other processes leave free."""

from __future__ import annotations

import torch
from typing_extensions import override

from handloom.accelerators.accelerator import Accelerator
from handloom.accelerators.registry import _AcceleratorRegistry
from handloom.devices import HardwareProbe, parse_devices

__all__ = ["CUDAAccelerator", "find_usable_cuda_devices", "is_cuda_available", "num_cuda_devices"]


class CUDAAccelerator(Accelerator):
    """Run on NVIDIA GPUs: one process per selected device."""

    @override
    def setup_device(self, device: torch.device) -> None:
        """Make ``device`` this process's current CUDA device.

        Raises:
            ValueError: ``device`` is not a CUDA device.
        """
        if device.type != "cuda":
            raise ValueError(
                f"CUDAAccelerator.setup_device({str(device)!r}) got a {device.type} device."
                " Pass a CUDA device such as torch.device('cuda', 0), or use the accelerator of that device."
            )
        torch.cuda.set_device(device)

    @override
    def teardown(self) -> None:
        """Return cached GPU memory to the driver."""
        torch.cuda.empty_cache()

    @staticmethod
    @override
    def parse_devices(devices: int | str | list[int]) -> list[int] | None:
        """The GPU indices ``devices`` selects: ``2`` or ``"2"`` -> ``[0, 1]``, ``"1,"`` -> ``[1]``,
        ``-1`` -> all visible; ``0``, ``"0"`` and ``[]`` mean no GPU (``None``).

        Raises:
            ValueError: more devices than are visible, duplicates, or unknown indices.
            TypeError: a value of another type.
        """
        if isinstance(devices, (list, tuple)) and not devices:
            return None
        if (isinstance(devices, int) and not isinstance(devices, bool) and devices == 0) or (
            isinstance(devices, str) and devices.strip() in ("0", "[]")
        ):
            return None
        return parse_devices(devices, "cuda", HardwareProbe(cuda_device_count=num_cuda_devices()))

    @staticmethod
    @override
    def get_parallel_devices(devices: list[int]) -> list[torch.device]:
        """``torch.device("cuda", i)`` for each index."""
        return [torch.device("cuda", i) for i in devices]

    @staticmethod
    @override
    def auto_device_count() -> int:
        """The number of visible GPUs."""
        return num_cuda_devices()

    @staticmethod
    @override
    def is_available() -> bool:
        """True when at least one GPU is visible."""
        return num_cuda_devices() > 0

    @staticmethod
    @override
    def name() -> str:
        """``"cuda"``."""
        return "cuda"

    @classmethod
    @override
    def register_accelerators(cls, accelerator_registry: _AcceleratorRegistry) -> None:
        """Register as ``"cuda"``."""
        accelerator_registry.register(cls.name(), cls, description=cls.__name__)


def num_cuda_devices() -> int:
    """The number of visible CUDA devices (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def is_cuda_available() -> bool:
    """True when CUDA can be used."""
    return torch.cuda.is_available()


def find_usable_cuda_devices(num_devices: int = -1) -> list[int]:
    """Indices of visible GPUs that accept a tensor now, for ``Fabric(devices=...)``.

    A GPU in exclusive mode that another process holds refuses the tensor and is skipped. Two
    processes that call this at the same moment may both pick the same free GPU.

    Args:
        num_devices: How many to find; ``-1`` (default) returns every usable one.

    Raises:
        ValueError: No GPU is visible, or ``num_devices`` exceeds the visible count.
        RuntimeError: Fewer than ``num_devices`` are free (the occupied ones are named).
    """
    if num_devices == 0:
        return []
    visible = num_cuda_devices()
    if visible == 0:
        raise ValueError(
            f"find_usable_cuda_devices({num_devices}) found no visible CUDA device."
            " Run where a GPU is visible (check CUDA_VISIBLE_DEVICES), or train on the CPU."
        )
    if num_devices > visible:
        raise ValueError(
            f"find_usable_cuda_devices({num_devices}) asks for more GPUs than the {visible} visible here."
            f" Ask for {visible} or fewer."
        )
    usable: list[int] = []
    occupied: list[int] = []
    for index in range(visible):
        try:
            torch.tensor(0, device=torch.device("cuda", index))
        except RuntimeError:
            occupied.append(index)
            continue
        usable.append(index)
        if len(usable) == num_devices:
            break
    if num_devices != -1 and len(usable) < num_devices:
        raise RuntimeError(
            f"find_usable_cuda_devices({num_devices}) found only {len(usable)} free GPUs:"
            f" {occupied} are held by other processes. Ask for fewer, or wait until they are released."
        )
    return usable
