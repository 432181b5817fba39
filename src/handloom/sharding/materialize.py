"""Give a model built on the meta device real values after it was sharded, shard by shard.

Each module that owns parameters and has ``reset_parameters`` is initialised on full-size
temporary tensors (the module and its descendants, one subtree at a time), and every rank keeps
its own slice of them (``distribute_tensor(..., src_data_rank=None)`` slices without
communicating). Every rank draws the same random numbers in the same order, so the result equals
a one-process initialisation with the same seed, on any number of processes and any layout, while
memory holds only the local shards plus one subtree at full size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def has_meta_tensors(module: torch.nn.Module) -> bool:
    """True when some parameter or buffer of ``module`` lives on the meta device."""
    return any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers())


def _owned(module: torch.nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    for name, param in module._parameters.items():
        if param is not None:
            yield "_parameters", name, param
    for name, buffer in module._buffers.items():
        if buffer is not None:
            yield "_buffers", name, buffer


def _full_like(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    full = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(full, requires_grad=tensor.requires_grad)
    return full


def _keep_local_slice(real: torch.Tensor, full: torch.Tensor) -> None:
    with torch.no_grad():
        if isinstance(real, DTensor):
            piece = distribute_tensor(full.detach(), real.device_mesh, real.placements, src_data_rank=None)
            real.to_local().copy_(piece.to_local())
        else:
            real.copy_(full.detach())


def _reset_method(module: torch.nn.Module) -> Callable[[], None] | None:
    """``reset_parameters``, or the private ``_reset_parameters`` some torch modules have instead
    (``nn.MultiheadAttention``), or ``None``."""
    for name in ("reset_parameters", "_reset_parameters"):
        method = getattr(module, name, None)
        if callable(method):
            return method  # type: ignore[no-any-return]
    return None


def _reset_subtree(root: torch.nn.Module, device: torch.device) -> None:
    """Run ``root.reset_parameters()`` on full-size stand-ins, then copy each rank's slice back."""
    swapped: list[tuple[torch.nn.Module, str, str, torch.Tensor, torch.Tensor]] = []
    for module in root.modules():
        for slot, name, real in list(_owned(module)):
            full = _full_like(real, device)
            getattr(module, slot)[name] = full
            swapped.append((module, slot, name, real, full))
    reset = _reset_method(root)
    assert reset is not None
    try:
        with torch.no_grad():
            reset()
    finally:
        for module, slot, name, real, _ in swapped:
            getattr(module, slot)[name] = real
    for _, _, _, real, full in swapped:
        _keep_local_slice(real, full)


def materialize(module: torch.nn.Module, device: torch.device) -> list[str]:
    """Allocate ``module``'s (local shards of) parameters and buffers on ``device`` and initialise them.

    Returns:
        Names of submodules that own parameters or buffers but have no ``reset_parameters``: their
        values are undefined until a checkpoint is loaded.
    """
    module.to_empty(device=device)
    without_reset: list[str] = []
    for name, sub in module.named_modules():
        if not any(True for _ in _owned(sub)):
            continue
        if _reset_method(sub) is not None:
            _reset_subtree(sub, device)
        else:
            without_reset.append(name or type(sub).__name__)
    return without_reset
