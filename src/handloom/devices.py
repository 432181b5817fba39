"""Accelerator names, the hardware probe, and parsing of the ``devices`` argument."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

AcceleratorName = Literal["cpu", "cuda", "mps"]
DevicesInput = int | str | list[int] | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class HardwareProbe:
    """What the machine offers, gathered once so option resolution can stay pure.

    Attributes:
        cuda_device_count: Visible CUDA devices.
        mps_available: True when Apple's MPS backend can be used.
        interactive: True in a notebook or an interactive interpreter.
        fork_available: True when the platform supports the ``fork`` start method.
    """

    cuda_device_count: int = 0
    mps_available: bool = False
    interactive: bool = False
    fork_available: bool = True


def probe_hardware() -> HardwareProbe:
    """Inspect this machine (CUDA count, MPS, interactivity, fork support)."""
    import multiprocessing

    import torch

    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return HardwareProbe(
        cuda_device_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        mps_available=mps,
        interactive=hasattr(sys, "ps1") or bool(sys.flags.interactive) or "ipykernel" in sys.modules,
        fork_available="fork" in multiprocessing.get_all_start_methods(),
    )


def resolve_accelerator(value: str, probe: HardwareProbe) -> AcceleratorName:
    """Turn the ``accelerator`` argument into a concrete, available accelerator.

    Raises:
        ValueError: Unknown name, or the accelerator is not available on this machine.
    """
    if value == "auto":
        if probe.mps_available:
            return "mps"
        return "cuda" if probe.cuda_device_count > 0 else "cpu"
    if value == "gpu":
        if probe.cuda_device_count > 0:
            return "cuda"
        if probe.mps_available:
            return "mps"
        raise ValueError(
            "Fabric(accelerator='gpu') found no GPU: no CUDA device is visible and MPS is not available."
            " Use accelerator='cpu', or run where a GPU is visible (check CUDA_VISIBLE_DEVICES)."
        )
    if value == "cpu":
        return "cpu"
    if value == "cuda":
        if probe.cuda_device_count == 0:
            raise ValueError(
                "Fabric(accelerator='cuda') cannot run here: no CUDA device is visible."
                " Use accelerator='cpu' or 'auto', or run where a GPU is visible"
                " (check CUDA_VISIBLE_DEVICES)."
            )
        return "cuda"
    if value == "mps":
        if not probe.mps_available:
            raise ValueError(
                "Fabric(accelerator='mps') cannot run here: Apple's MPS backend is not available."
                " Use accelerator='cpu' or 'auto'."
            )
        return "mps"
    if value == "tpu":
        raise ValueError(
            "Fabric(accelerator='tpu') cannot run: handloom does not support TPUs or other XLA devices."
            " Choose one of: 'cpu', 'cuda', 'gpu', 'mps', 'auto'."
        )
    raise ValueError(
        f"Fabric(accelerator={value!r}) is not a known accelerator."
        " Choose one of: 'cpu', 'cuda', 'gpu', 'mps', 'auto'."
    )


def _device_error(devices: object, why: str, fix: str) -> ValueError:
    return ValueError(f"Fabric(devices={devices!r}) {why}. {fix}")


def _parse_index_list(devices: object, items: list[int], available: int) -> list[int]:
    if not items:
        raise _device_error(devices, "selects no device", "Pass a positive count such as devices=1.")
    if len(set(items)) != len(items):
        raise _device_error(devices, "lists a device twice", "Give each device index once.")
    missing = [i for i in items if i < 0 or i >= available]
    if missing:
        raise _device_error(
            devices,
            f"names device index {missing[0]}, but only indices 0..{available - 1} exist here",
            "Choose from the visible devices (see CUDA_VISIBLE_DEVICES).",
        )
    return items


def _parse_count(devices: object, count: int, available: int | None) -> int:
    if count == 0:
        raise _device_error(
            devices, "selects no device", "Pass devices=1 or more (use accelerator='cpu' for CPU training)."
        )
    if count < -1:
        raise _device_error(devices, "is negative", "Pass a positive count, or -1 for every visible device.")
    if count == -1:
        if available is None:
            raise _device_error(
                devices,
                "asks for 'every device', which has no meaning on the CPU",
                "Pass the number of CPU processes, for example devices=2.",
            )
        return available
    if available is not None and count > available:
        raise _device_error(
            devices,
            f"asks for {count} devices, but only {available} are visible",
            f"Pass devices={available} or fewer.",
        )
    return count


def parse_devices(
    devices: DevicesInput, accelerator: AcceleratorName, probe: HardwareProbe, *, interactive: bool = False
) -> list[int]:
    """Return the device indices to use on this node (for the CPU: ``0..n-1`` for ``n`` processes).

    Accepts an int (``-1`` means all), a digit string (``"2"`` is a count, not an index), a
    comma list (``"0,1"``, ``"1,"``), a list/tuple of indices, or ``"auto"``.

    Raises:
        ValueError: zero devices, more than exist, duplicates, unknown indices or bad strings.
        TypeError: a value of an unsupported type (bool, float, ...).
    """
    available: int | None
    if accelerator == "cuda":
        available = probe.cuda_device_count
    elif accelerator == "mps":
        available = 1
    else:
        available = None
    if isinstance(devices, bool) or not isinstance(devices, (int, str, list, tuple)):
        raise TypeError(
            f"Fabric(devices={devices!r}) has type {type(devices).__name__}."
            " Pass an int, a list of device indices, a string such as '2' or '0,1', or 'auto'."
        )
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto":
            if available is None:
                return [0]
            return [0] if interactive else list(range(available))
        if "," in text or text.startswith("["):
            try:
                items = [int(part) for part in text.strip("[]").split(",") if part.strip()]
            except ValueError:
                raise _device_error(
                    devices, "is not a list of integers", "Write indices like '0,1' or a count like '2'."
                ) from None
            return _as_indices(devices, items, accelerator, available)
        try:
            count = int(text)
        except ValueError:
            raise _device_error(
                devices, "is not a device count", "Write a count like '2', indices like '0,1', or 'auto'."
            ) from None
        return list(range(_parse_count(devices, count, available)))
    if isinstance(devices, int):
        return list(range(_parse_count(devices, devices, available)))
    if any(isinstance(i, bool) or not isinstance(i, int) for i in devices):
        raise TypeError(f"Fabric(devices={devices!r}) must list integer device indices.")
    return _as_indices(devices, list(devices), accelerator, available)


def _as_indices(devices: object, items: list[int], accelerator: str, available: int | None) -> list[int]:
    if available is None:
        raise _device_error(
            devices,
            f"lists device indices, which only apply to GPUs, not to accelerator={accelerator!r}",
            "Pass the number of CPU processes instead, for example devices=2.",
        )
    return _parse_index_list(devices, items, available)
