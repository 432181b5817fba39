"""Give a model built on the meta device real values after it was sharded, shard by shard.

Each module that owns parameters or buffers and has ``reset_parameters`` is initialised on
full-size temporary tensors, and every rank keeps its own slice of them
(``distribute_tensor(..., src_data_rank=None)`` slices without communicating). Every rank draws
the same random numbers in the same order, so the result equals a one-process initialisation with
the same seed (``to_empty`` then ``reset_parameters`` module by module), on any number of
processes and any layout.

While ``reset_parameters`` runs, every parameter and buffer of the module's subtree is replaced by
a storage-less stand-in on the meta device, and a ``TorchFunctionMode`` hands the method a
full-size tensor in its place the first time it uses one. Memory thus holds the local shards plus
the full-size tensors that one ``reset_parameters`` call touches (a root whose method only
rebuilds its own buffers, such as litgpt's RoPE cache, allocates only those). Afterwards, whatever
each slot holds becomes the real value: the stand-in's full tensor, or a tensor the method
assigned or registered (``self.cos = build_cache(...)``), sliced where the slot is sharded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.overrides import TorchFunctionMode

# Functions that read only a tensor's metadata: the meta stand-in answers them without allocating.
_Tensor: Any = torch.Tensor  # its properties' getters, which the type stubs do not describe
_METADATA: frozenset[Any] = frozenset(
    {
        _Tensor.shape.__get__,
        _Tensor.dtype.__get__,
        _Tensor.ndim.__get__,
        _Tensor.requires_grad.__get__,
        torch.Tensor.size,
        torch.Tensor.dim,
        torch.Tensor.numel,
        torch.Tensor.__len__,
        torch.Tensor.is_floating_point,
        torch.Tensor.is_complex,
    }
)


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


def _empty_like(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of ``tensor``'s global shape and dtype; a Parameter for a Parameter."""
    empty = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(empty, requires_grad=tensor.requires_grad)
    return empty


class _StandIns(TorchFunctionMode):
    """Meta stand-ins for a subtree's tensors, each backed by a full-size tensor made on first use."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self._stand_ins: dict[int, torch.Tensor] = {}  # keeps the stand-ins alive, so ids stay unique
        self._full: dict[int, torch.Tensor] = {}

    def add(self, real: torch.Tensor) -> torch.Tensor:
        stand_in = _empty_like(real, torch.device("meta"))
        self._stand_ins[id(stand_in)] = stand_in
        return stand_in

    def used(self, stand_in: torch.Tensor) -> torch.Tensor | None:
        """The full tensor behind ``stand_in`` if ``reset_parameters`` touched it, else ``None``."""
        return self._full.get(id(stand_in))

    def resolve(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` itself, or the full tensor behind it when it is a stand-in."""
        if id(tensor) not in self._stand_ins:
            return tensor
        full = self._full.get(id(tensor))
        if full is None:
            full = self._full[id(tensor)] = _empty_like(tensor, self.device)
        return full

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _METADATA:
            return func(*args, **kwargs)
        return func(*self._swap(args), **self._swap(kwargs))

    def _swap(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.resolve(value)
        if isinstance(value, list | tuple):
            swapped = [self._swap(v) for v in value]
            return swapped if isinstance(value, list) else tuple(swapped)
        if isinstance(value, dict):
            return {k: self._swap(v) for k, v in value.items()}
        return value


def _keep_local_slice(real: torch.Tensor, full: torch.Tensor) -> None:
    with torch.no_grad():
        if isinstance(real, DTensor):
            piece = distribute_tensor(
                full.detach().to(real.device), real.device_mesh, real.placements, src_data_rank=None
            )
            real.to_local().copy_(piece.to_local())
        else:
            real.copy_(full.detach())


def _on_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.device == device or tensor.is_meta or isinstance(tensor, DTensor):
        return tensor
    moved = tensor.detach().to(device)
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(moved, requires_grad=tensor.requires_grad)
    return moved


def _adopt(
    reset: str, where: str, real: torch.Tensor, new: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """What a slot holds after ``reset`` assigned ``new`` where ``real`` was."""
    if isinstance(new, DTensor):
        return new  # the method built its own distributed tensor
    if isinstance(real, DTensor):
        if new.shape != real.shape:
            raise ValueError(
                f"{reset}() replaced the sharded tensor {where!r} of shape {tuple(real.shape)}"
                f" with one of shape {tuple(new.shape)}. A sharded tensor keeps the shape it had when"
                " the model was sharded, so build it with its final shape in __init__."
            )
        _keep_local_slice(real, new)  # copy_ casts to the sharded tensor's dtype
        return real
    if new.shape == real.shape and new.dtype == real.dtype:
        _keep_local_slice(real, new)  # in place: whoever holds the tensor sees the values
        return real
    return _on_device(new, device)


def _reset_method(module: torch.nn.Module) -> Callable[[], None] | None:
    """``reset_parameters``, or the private ``_reset_parameters`` some torch modules have instead
    (``nn.MultiheadAttention``), or ``None``."""
    for name in ("reset_parameters", "_reset_parameters"):
        method = getattr(module, name, None)
        if callable(method):
            return method  # type: ignore[no-any-return]
    return None


def _reset_subtree(root: torch.nn.Module, device: torch.device) -> None:
    """Run ``root.reset_parameters()`` on full-size stand-ins, then keep each rank's slice of the result."""
    stand_ins = _StandIns(device)
    by_real: dict[int, torch.Tensor] = {}  # tied tensors share one stand-in
    slots: list[tuple[torch.nn.Module, str, str, str, torch.Tensor, torch.Tensor]] = []
    for prefix, module in root.named_modules():
        for slot, name, real in list(_owned(module)):
            stand_in = by_real.get(id(real))
            if stand_in is None:
                stand_in = by_real[id(real)] = stand_ins.add(real)
            getattr(module, slot)[name] = stand_in
            slots.append((module, slot, name, f"{prefix}.{name}" if prefix else name, real, stand_in))
    reset = _reset_method(root)
    assert reset is not None
    reset_name = f"{type(root).__name__}.{getattr(reset, '__name__', 'reset_parameters')}"
    try:
        with torch.no_grad(), stand_ins:
            reset()
    except BaseException:
        for module, slot, name, _, real, _ in slots:
            getattr(module, slot)[name] = real
        raise
    known = {(id(module), slot, name) for module, slot, name, *_ in slots}
    kept: set[int] = set()
    for module, slot, name, where, real, stand_in in slots:
        table = getattr(module, slot)
        now = table.get(name)
        if now is stand_in:
            table[name] = real
            full = stand_ins.used(stand_in)
            if full is not None and id(real) not in kept:  # an untouched tensor stays as it was
                kept.add(id(real))
                _keep_local_slice(real, full)
        elif now is not None:  # the method assigned another tensor to this slot
            table[name] = _adopt(reset_name, where, real, stand_ins.resolve(now), device)
    for module in root.modules():  # tensors the method registered under new names
        for slot, name, tensor in list(_owned(module)):
            if (id(module), slot, name) not in known:
                getattr(module, slot)[name] = _on_device(stand_ins.resolve(tensor), device)


def materialize(module: torch.nn.Module, device: torch.device) -> list[str]:
    """Allocate ``module``'s (local shards of) parameters and buffers on ``device`` and initialise them.

    Returns:
        Names of submodules that own parameters or buffers but have no ``reset_parameters``: their
        values are undefined until a checkpoint is loaded.

    Raises:
        ValueError: A ``reset_parameters`` gave a sharded tensor another shape.
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
