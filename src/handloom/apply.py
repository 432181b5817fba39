"""Apply a function to every tensor inside nested Python collections."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import torch


def apply_to_tensors(data: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Return ``data`` with ``fn`` applied to every tensor, keeping container types.

    Handles tensors, mappings (dict subclasses such as Hugging Face ``ModelOutput`` keep their
    type), named tuples, lists, tuples and dataclass instances; anything else is returned as is.
    """
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, dict) and type(data) is dict:
        return {key: apply_to_tensors(value, fn) for key, value in data.items()}
    if isinstance(data, MutableMapping):
        out = copy.copy(data)
        for key, value in data.items():
            out[key] = apply_to_tensors(value, fn)
        return out
    if isinstance(data, Mapping):
        return {key: apply_to_tensors(value, fn) for key, value in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(apply_to_tensors(item, fn) for item in data))
    if isinstance(data, (list, tuple)):
        return type(data)(apply_to_tensors(item, fn) for item in data)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        changes = {
            f.name: apply_to_tensors(getattr(data, f.name), fn) for f in dataclasses.fields(data) if f.init
        }
        return dataclasses.replace(data, **changes)
    return data


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
