"""dtype helpers shared by the precision plugins: default-dtype contexts and floating-point casts."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from handloom.apply import apply_to_tensors


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily make ``dtype`` torch's default floating dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# Casts that change only real floating-point tensors (complex and integer ones keep their dtype).
_REAL_CASTS: dict[torch.dtype, Callable[[torch.nn.Module], torch.nn.Module]] = {
    torch.float64: torch.nn.Module.double,
    torch.float32: torch.nn.Module.float,
    torch.float16: torch.nn.Module.half,
    torch.bfloat16: torch.nn.Module.bfloat16,
}


def cast_module(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a module's real floating-point parameters and buffers to ``dtype``.

    Complex and integer tensors keep their dtype, as with ``module.double()`` or ``module.half()``
    (``module.to(dtype=...)`` would also cast complex tensors and drop their imaginary part).
    """
    return _REAL_CASTS[dtype](module)


def cast_floating(data: Any, dtype: torch.dtype) -> Any:
    """Return ``data`` with every floating-point tensor in it cast to ``dtype``; others unchanged."""

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor

    if type(data) is torch.Tensor:  # the common case, without walking a collection
        return cast(data)
    return apply_to_tensors(data, cast)


def to_default_dtype(data: Any) -> Any:
    """Cast floating-point outputs back to torch's default dtype, so losses run in full precision."""
    return cast_floating(data, torch.get_default_dtype())


def cast_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], dtype: torch.dtype
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """:func:`cast_floating` of a call's arguments, without walking plain tensor arguments."""
    cast_args = tuple(
        (a.to(dtype) if a.is_floating_point() and a.dtype != dtype else a)
        if type(a) is torch.Tensor
        else cast_floating(a, dtype)
        for a in args
    )
    return cast_args, (cast_floating(kwargs, dtype) if kwargs else kwargs)
