"""``lightning.fabric.utilities.optimizer``: moving optimizer state between devices.

Lightning defines no public names here; its two private helpers are offered because programs
use them to move a loaded optimizer's state.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping

import torch

from handloom.apply import apply_to_collection, move_data_to_device

__all__: list[str] = []


def _optimizers_to_device(
    optimizers: Iterable[torch.optim.Optimizer], device: torch.device | str | int
) -> None:
    """Move the state of each optimizer to ``device`` (see :func:`_optimizer_to_device`)."""
    for optimizer in optimizers:
        _optimizer_to_device(optimizer, device)


def _optimizer_to_device(optimizer: torch.optim.Optimizer, device: torch.device | str | int) -> None:
    """Move ``optimizer``'s state tensors to ``device`` in place; ``step`` counters stay where they are.

    PyTorch's optimizers expect ``step`` on the CPU (unless ``capturable``), so it is not moved.
    """
    for param, value in optimizer.state.items():
        if not isinstance(value, MutableMapping):
            optimizer.state[param] = apply_to_collection(value, torch.Tensor, move_data_to_device, device)
            continue
        for key, entry in value.items():
            if key != "step":
                value[key] = move_data_to_device(entry, device)
