"""Apply a function to every tensor inside nested Python collections."""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import torch


def apply_to_tensors(data: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Return ``data`` with ``fn`` applied to every tensor, keeping container types.

    Handles tensors, mappings (dict subclasses such as Hugging Face ``ModelOutput`` keep their
    type), named tuples, lists, tuples and dataclass instances; anything else is returned as is.
    """
    return _apply(data, torch.Tensor, fn)


def _apply(data: Any, kinds: type | tuple[type, ...], fn: Callable[[Any], Any]) -> Any:
    """Return ``data`` with ``fn`` applied to every instance of ``kinds``, keeping container types."""
    if isinstance(data, kinds):
        return fn(data)
    if isinstance(data, dict) and type(data) is dict:
        return {key: _apply(value, kinds, fn) for key, value in data.items()}
    if isinstance(data, MutableMapping):
        out = copy.copy(data)
        for key, value in data.items():
            out[key] = _apply(value, kinds, fn)
        return out
    if isinstance(data, Mapping):
        return {key: _apply(value, kinds, fn) for key, value in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(_apply(item, kinds, fn) for item in data))
    if isinstance(data, (list, tuple)):
        return type(data)(_apply(item, kinds, fn) for item in data)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        changes = {
            f.name: _apply(getattr(data, f.name), kinds, fn) for f in dataclasses.fields(data) if f.init
        }
        return dataclasses.replace(data, **changes)
    return data


def convert_to_tensors(data: Any, device: torch.device) -> Any:
    """Turn every Python number and NumPy array inside ``data`` into a tensor on ``device``.

    The dtypes are Lightning's: ``bool`` becomes ``uint8`` (NCCL has no bool), ``int`` becomes
    ``int32`` and ``float`` becomes ``float32``; an array keeps its dtype (and, on the CPU, shares
    its memory). Tensors and anything else are left as they are.
    """
    numpy = sys.modules.get("numpy")  # an array can only exist if NumPy was imported
    kinds: tuple[type, ...] = (bool, int, float) if numpy is None else (bool, int, float, numpy.ndarray)

    def convert(value: Any) -> torch.Tensor:
        if isinstance(value, bool):
            return torch.tensor(value, dtype=torch.uint8, device=device)
        if isinstance(value, int):
            return torch.tensor(value, dtype=torch.int32, device=device)
        if isinstance(value, float):
            return torch.tensor(value, dtype=torch.float32, device=device)
        return torch.from_numpy(value).to(device)

    return _apply(data, kinds, convert)


def move_data_to_device(data: Any, device: torch.device | str) -> Any:
    """Move every tensor in ``data`` to ``device`` (non-blocking for CUDA targets).

    Objects that are not tensors but have a ``.to(device)`` method (e.g. a batch class) are moved
    with it too.
    """
    device = torch.device(device)
    non_blocking = device.type == "cuda"

    def move(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, non_blocking=non_blocking)

    if not isinstance(data, (torch.Tensor, Mapping, list, tuple)) and callable(getattr(data, "to", None)):
        return data.to(device)
    return apply_to_tensors(data, move)
