"""Gradient-norm clipping over sharded (DTensor) gradients that may live on different meshes."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.distributed.tensor import DTensor


def _mesh_key(grad: torch.Tensor) -> object:
    if isinstance(grad, DTensor):
        return (id(grad.device_mesh), grad.placements)
    return None


def _group_by_mesh(parameters: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for param in parameters:
        if param.grad is not None:
            groups[_mesh_key(param.grad)].append(param)
    return list(groups.values())


def _combine(norms: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    if not norms:
        return torch.tensor(0.0)
    device = norms[0].device
    stacked = torch.stack([n.to(device, torch.float32) for n in norms])
    if math.isinf(norm_type):
        return stacked.max()
    return stacked.pow(norm_type).sum().pow(1.0 / norm_type)


def total_grad_norm(groups: list[list[torch.Tensor]], norm_type: float) -> torch.Tensor:
    """The norm of all gradients of ``groups`` taken together, the same on every rank.

    Each group holds parameters whose gradients share a mesh and placement (or are plain tensors);
    ``torch.nn.utils.get_total_norm`` computes a group's norm, a DTensor norm is reduced over its
    mesh with ``full_tensor()``, and the groups' norms are combined.
    """
    norms: list[torch.Tensor] = []
    for members in groups:
        grads = [p.grad for p in members if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    return _combine(norms, norm_type)


def nonfinite_norm_message(norm_type: float, total: torch.Tensor) -> str:
    """What ``clip_gradients(..., error_if_nonfinite=True)`` says when the norm is NaN or infinite."""
    return (
        f"The total norm of order {norm_type} of the gradients is {total.item()}, so they cannot be"
        " clipped. Look for a NaN/inf loss, lower the learning rate, or pass error_if_nonfinite=False"
        " to clip anyway."
    )


def clip_grad_norm(
    parameters: list[torch.Tensor], max_norm: float, norm_type: float, error_if_nonfinite: bool
) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm``; return the norm before clipping.

    Raises:
        RuntimeError: ``error_if_nonfinite`` and the norm is NaN or infinite.
    """
    groups = _group_by_mesh(parameters)
    total = total_grad_norm(groups, float(norm_type))
    if error_if_nonfinite and not torch.isfinite(total).item():
        raise RuntimeError(nonfinite_norm_message(norm_type, total))
    for members in groups:
        torch.nn.utils.clip_grads_with_norm_(members, max_norm, total)
    return total
