"""``.device`` and ``.dtype`` on modules that follow ``.to()``, ``.cuda()``, ``.half()`` and the like.

:class:`_DeviceDtypeModuleMixin` is Lightning's mixin of the same name (``lightning.fabric.utilities.
device_dtype_mixin``); the set-up module ``fabric.setup`` returns is one, and so may be a user's own
modules. :func:`_update_properties` records a device or dtype on every such module in a tree without
moving anything.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from typing_extensions import Self, override

__all__ = ["_DeviceDtypeModuleMixin", "_update_properties"]


class _DeviceDtypeModuleMixin(torch.nn.Module):
    """A module with ``.device`` and ``.dtype`` properties kept up to date by its conversion methods.

    They start as torch's default device and dtype; ``.to(...)``, ``.cuda()``, ``.cpu()``,
    ``.type(...)``, ``.float()``, ``.double()`` and ``.half()`` update them on this module and on
    every such module inside it.
    """

    __jit_unused_properties__: list[str] = ["device", "dtype"]  # noqa: RUF012  (torch.jit reads it)

    def __init__(self) -> None:
        super().__init__()
        self._dtype: str | torch.dtype = torch.get_default_dtype()
        self._device: torch.device = torch.get_default_device()

    @property
    def dtype(self) -> str | torch.dtype:
        """The dtype the module was last converted to."""
        return self._dtype

    @dtype.setter
    def dtype(self, new_dtype: str | torch.dtype) -> None:
        raise RuntimeError(
            f"module.dtype = {new_dtype!r} cannot set the dtype: it records what the parameters were"
            f" converted to. Convert them with module.to({new_dtype!r})."
        )

    @property
    def device(self) -> torch.device:
        """The device the module was last moved to (a CUDA device always with its index)."""
        device = self._device
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device

    @override
    def to(self, *args: Any, **kwargs: Any) -> Self:
        """See :meth:`torch.nn.Module.to`."""
        result = super().to(*args, **kwargs)
        device, dtype = _parse_to_arguments(args, kwargs)
        _update_properties(self, device=device, dtype=dtype)
        return result

    @override
    def cuda(self, device: torch.device | int | None = None) -> Self:
        """See :meth:`torch.nn.Module.cuda`."""
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif isinstance(device, int):
            device = torch.device("cuda", device)
        result = super().cuda(device=device)
        _update_properties(self, device=device)
        return result

    @override
    def cpu(self) -> Self:
        """See :meth:`torch.nn.Module.cpu`."""
        result = super().cpu()
        _update_properties(self, device=torch.device("cpu"))
        return result

    @override
    def type(self, dst_type: str | torch.dtype) -> Self:
        """See :meth:`torch.nn.Module.type`."""
        result = super().type(dst_type=dst_type)
        _update_properties(self, dtype=dst_type)
        return result

    @override
    def float(self) -> Self:
        """See :meth:`torch.nn.Module.float`."""
        result = super().float()
        _update_properties(self, dtype=torch.float)
        return result

    @override
    def double(self) -> Self:
        """See :meth:`torch.nn.Module.double`."""
        result = super().double()
        _update_properties(self, dtype=torch.double)
        return result

    @override
    def half(self) -> Self:
        """See :meth:`torch.nn.Module.half`."""
        result = super().half()
        _update_properties(self, dtype=torch.half)
        return result


def _parse_to_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.device | None, torch.dtype | None]:
    """The device and dtype a ``Module.to(...)`` call names (``None`` for what it leaves alone)."""
    device: Any = kwargs.get("device")
    dtype: torch.dtype | None = kwargs.get("dtype")
    tensor = kwargs.get("tensor")
    for arg in args:
        if isinstance(arg, torch.Tensor):
            tensor = arg
        elif isinstance(arg, torch.dtype):
            dtype = arg
        elif isinstance(arg, (str, torch.device)) or (isinstance(arg, int) and not isinstance(arg, bool)):
            device = arg
    if tensor is not None:
        device, dtype = tensor.device, tensor.dtype
    if isinstance(device, int):
        device = torch.device("cuda", device)  # as Module.to reads a bare index
    return (torch.device(device) if device is not None else None), dtype


def _mixin_classes() -> tuple[type, ...]:
    """This mixin, and Lightning's own when Lightning is loaded (a LightningModule set up by handloom)."""
    lightning = sys.modules.get("lightning.fabric.utilities.device_dtype_mixin")
    theirs = getattr(lightning, "_DeviceDtypeModuleMixin", None)
    return (_DeviceDtypeModuleMixin, theirs) if isinstance(theirs, type) else (_DeviceDtypeModuleMixin,)


def _update_properties(
    root: torch.nn.Module, device: torch.device | None = None, dtype: str | torch.dtype | None = None
) -> None:
    """Record ``device`` and/or ``dtype`` on every device/dtype mixin module in ``root`` (nothing moves)."""
    classes = _mixin_classes()
    for module in root.modules():
        if not isinstance(module, classes):
            continue
        target: Any = module
        if device is not None:
            target._device = device
        if dtype is not None:
            target._dtype = dtype
