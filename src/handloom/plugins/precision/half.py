"""Training entirely in a lower (``"16-true"``, ``"bf16-true"``) or higher (``"64-true"``) precision."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from typing_extensions import override

from handloom.amp import cast_module, default_dtype
from handloom.plugins.precision.precision import _CastingPrecision


class _TruePrecision(_CastingPrecision):
    """Parameters, inputs and new tensors all in one dtype; outputs back in the default dtype."""

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return cast_module(module, self.dtype)

    @override
    def tensor_init_context(self) -> AbstractContextManager[Any]:
        return default_dtype(self.dtype)

    @override
    def module_init_context(self) -> AbstractContextManager[Any]:
        return default_dtype(self.dtype)

    @override
    def forward_context(self) -> AbstractContextManager[Any]:
        return default_dtype(self.dtype)


class HalfPrecision(_TruePrecision):
    """Parameters and computation in float16 (``"16-true"``) or bfloat16 (``"bf16-true"``).

    Args:
        precision: ``"16-true"`` or ``"bf16-true"``.

    Raises:
        ValueError: Another precision was named.
    """

    def __init__(self, precision: Literal["bf16-true", "16-true"] = "16-true") -> None:
        if precision not in ("16-true", "bf16-true"):
            raise ValueError(
                f"HalfPrecision(precision={precision!r}) is not a half precision."
                " Pass '16-true' or 'bf16-true' (use MixedPrecision for '16-mixed'/'bf16-mixed')."
            )
        self.precision = precision
        self.dtype = torch.bfloat16 if precision == "bf16-true" else torch.float16


class DoublePrecision(_TruePrecision):
    """Parameters and computation in float64 (``"64-true"``)."""

    precision = "64-true"
    dtype = torch.float64
