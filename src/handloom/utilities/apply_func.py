"""``lightning.fabric.utilities.apply_func``: collection helpers, over :mod:`handloom.apply`."""

from __future__ import annotations

from typing import Any

import torch

from handloom import apply
from handloom.apply import apply_to_collection, move_data_to_device

__all__ = ["apply_to_collection", "convert_tensors_to_scalars", "convert_to_tensors", "move_data_to_device"]


def convert_to_tensors(data: Any, device: torch.device | str | int) -> Any:
    """Turn Python numbers and NumPy arrays in ``data`` into tensors on ``device`` and move the rest there.

    ``bool`` becomes ``uint8``, ``int`` ``int32`` and ``float`` ``float32``, as in Lightning; tensors
    (and other objects with ``.to``) already in ``data`` are moved with :func:`move_data_to_device`.
    """
    return move_data_to_device(apply.convert_to_tensors(data, device), device)


def convert_tensors_to_scalars(data: Any) -> Any:
    """Replace every one-element tensor in ``data`` by its Python number (``tensor.item()``).

    Raises:
        ValueError: A tensor with more than one element.
    """

    def to_item(tensor: torch.Tensor) -> Any:
        if tensor.numel() != 1:
            raise ValueError(
                f"convert_tensors_to_scalars() got a tensor of shape {tuple(tensor.shape)}, which is not"
                " one number. Reduce it first (e.g. tensor.mean()) or keep it out of the collection."
            )
        return tensor.item()

    return apply_to_collection(data, torch.Tensor, to_item)
