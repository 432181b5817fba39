"""Precision under FSDP2: ``*-mixed`` becomes FSDP2's ``MixedPrecisionPolicy`` instead of autocast."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from handloom.amp import cast_floating, cast_module, default_dtype, to_default_dtype
from handloom.plugins.precision.amp import _ScaledPrecision

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

_SUPPORTED = ("32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed")
_COMPUTE_DTYPES = {
    "16-true": torch.float16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16,
    "bf16-mixed": torch.bfloat16,
}


class FSDPPrecision(_ScaledPrecision):
    """The precision plugin of :class:`~handloom.strategies.FSDPStrategy`.

    ``*-mixed``: the sharded master weights stay in float32; FSDP2 all-gathers them in the low dtype
    (:attr:`mixed_precision_config`) and reduces gradients in float32, so the forward pass runs
    without autocast and its floating-point outputs come back in float32. ``fabric.autocast()``
    still gives autocast for code outside the model. ``*-true``: the model is cast before sharding.
    ``"16-mixed"`` uses a gradient scaler whose overflow check is reduced over the mesh.

    Args:
        precision: One of ``"32-true"``, ``"16-true"``, ``"bf16-true"``, ``"16-mixed"``, ``"bf16-mixed"``.
        scaler: The ``torch.amp.GradScaler`` for ``"16-mixed"`` (one is made if omitted).

    Raises:
        ValueError: An unsupported precision, or a scaler for a precision that does not scale.
    """

    def __init__(self, precision: str, scaler: torch.amp.GradScaler | None = None) -> None:
        if precision not in _SUPPORTED:
            raise ValueError(
                f"FSDPPrecision(precision={precision!r}) is not supported under FSDP."
                f" Choose one of: {', '.join(repr(p) for p in _SUPPORTED)}."
            )
        if scaler is not None and precision != "16-mixed":
            raise ValueError(
                f"FSDPPrecision(precision={precision!r}, scaler={scaler!r}): only '16-mixed' scales"
                " gradients. Drop the scaler, or use precision='16-mixed'."
            )
        self.precision = precision
        #: The device type autocast and the scaler run on; the strategy sets it when it starts.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._dtype = _COMPUTE_DTYPES.get(precision)
        self._mixed = precision.endswith("-mixed")
        self._default_scaler = scaler is None and precision == "16-mixed"
        self._scaler_device = self.device
        self._init_scaler(torch.amp.GradScaler(self.device) if self._default_scaler else scaler)

    def _bind_device(self, device_type: str) -> None:
        """Set the device type once the strategy knows it (before the first step)."""
        self.device = device_type
        if self._default_scaler and self._scaler_device != device_type:
            self._init_scaler(torch.amp.GradScaler(device_type))
            self._scaler_device = device_type

    @property
    def mixed_precision_config(self) -> MixedPrecisionPolicy:
        """FSDP2's ``MixedPrecisionPolicy`` for this precision.

        ``*-mixed`` all-gathers parameters in the low dtype and reduces gradients in float32;
        ``*-true`` and ``32-true`` change nothing (the parameters were cast already).
        """
        from handloom.precision import build_precision_policy
        from handloom.sharding.precision import mixed_precision_policy

        return mixed_precision_policy(build_precision_policy(self.precision))  # type: ignore[arg-type]

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        if self._dtype is not None and not self._mixed:
            return cast_module(module, self._dtype)
        return module

    def _true_dtype_context(self) -> AbstractContextManager[Any]:
        if self._dtype is not None and not self._mixed:
            return default_dtype(self._dtype)
        return nullcontext()

    @override
    def tensor_init_context(self) -> AbstractContextManager[Any]:
        return self._true_dtype_context()

    @override
    def module_init_context(self) -> AbstractContextManager[Any]:
        return self._true_dtype_context()

    @override
    def forward_context(self) -> AbstractContextManager[Any]:
        if self._mixed:
            return torch.autocast(self.device, dtype=self._dtype)
        return self._true_dtype_context()

    @override
    def convert_input(self, data: Any) -> Any:
        if self._dtype is not None and not self._mixed:
            return cast_floating(data, self._dtype)
        return data

    @override
    def convert_output(self, data: Any) -> Any:
        return to_default_dtype(data)

    @override
    def wrap_forward(self, call: Callable[..., Any]) -> Callable[..., Any]:
        if type(self) is not FSDPPrecision:
            return super().wrap_forward(call)
        if self.precision == "32-true":
            return call
        if not self._mixed:
            return super().wrap_forward(call)

        def sharded_mixed_forward(*args: Any, **kwargs: Any) -> Any:
            return to_default_dtype(call(*args, **kwargs))

        return sharded_mixed_forward
