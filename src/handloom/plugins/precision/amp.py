"""Automatic mixed precision (``"16-mixed"``, ``"bf16-mixed"``): ``torch.autocast`` and a gradient scaler."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from typing_extensions import override

from handloom.amp import cast_arguments, to_default_dtype
from handloom.plugins.precision.precision import Precision, _CastingPrecision


class _ScaledPrecision(Precision):
    """The gradient-scaler bookkeeping shared by :class:`MixedPrecision` and ``FSDPPrecision``.

    With a scaler, each backward scales the loss; each optimizer steps through the scaler (skipping
    steps whose gradients overflowed) at most once per backward; gradients are unscaled at most once
    per step (``fabric.clip_gradients`` may ask for it); the scale is updated after a step, except
    while another optimizer was unscaled for this step and has not stepped yet (an update then would
    make the scaler unscale that optimizer's gradients again, with the new scale).
    """

    scaler: torch.amp.GradScaler | None

    def _init_scaler(self, scaler: torch.amp.GradScaler | None) -> None:
        self.scaler = scaler
        self._num_backwards = 0  # scaled backward passes so far
        self._stepped_at: dict[int, int] = {}  # per optimizer (by id): the count at its last step
        self._unscaled: set[int] = set()
        self._update_pending = False

    @override
    def backward(
        self, tensor: torch.Tensor, model: torch.nn.Module | None, *args: Any, **kwargs: Any
    ) -> None:
        if self.scaler is None:
            super().backward(tensor, model, *args, **kwargs)
            return
        if self._update_pending:  # an unscaled optimizer was never stepped: the step is over
            self._update()
        super().backward(self.scaler.scale(tensor), model, *args, **kwargs)
        self._num_backwards += 1

    @override
    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        if self.scaler is None:
            return optimizer.step(**kwargs)
        if kwargs.get("closure") is not None or isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(
                f"optimizer.step(closure) cannot be used with precision={self.precision!r}: the gradient"
                " scaler needs the backward pass to happen before the step. Use precision='bf16-mixed' or"
                " '32-true' for closure-based optimizers such as LBFGS."
            )
        if self._stepped_at.get(id(optimizer), 0) == self._num_backwards:
            raise RuntimeError(
                f"optimizer.step() was called without fabric.backward(loss) since this optimizer's last"
                f" step. With precision={self.precision!r} the loss must be scaled: replace"
                " loss.backward() with fabric.backward(loss)."
            )
        result = self.scaler.step(optimizer, **kwargs)
        self._stepped_at[id(optimizer)] = self._num_backwards
        self._unscaled.discard(id(optimizer))
        self._update_pending = True
        if not self._unscaled:
            self._update()
        return result

    def _update(self) -> None:
        assert self.scaler is not None
        self.scaler.update()
        self._update_pending = False
        self._unscaled.clear()

    @override
    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None or id(optimizer) in self._unscaled:
            return
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            raise NotImplementedError(
                f"fabric.clip_gradients cannot unscale the gradients of {type(optimizer).__name__}: it"
                " unscales them inside its own step (fused optimizers do). Use fused=False for clipping."
            )
        self.scaler.unscale_(optimizer)
        self._unscaled.add(id(optimizer))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else self.scaler.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scaler is not None and state_dict:
            self.scaler.load_state_dict(state_dict)


class MixedPrecision(_ScaledPrecision, _CastingPrecision):
    """Autocast to float16 (``"16-mixed"``, with a gradient scaler) or bfloat16 (``"bf16-mixed"``).

    Parameters stay in float32; the forward pass runs under ``torch.autocast``, its floating-point
    inputs are cast to the autocast dtype and its outputs back to the default dtype.

    Args:
        precision: ``"16-mixed"`` or ``"bf16-mixed"``.
        device: The device type autocast and the scaler run on (``"cuda"``, ``"cpu"``, ``"mps"``).
        scaler: The ``torch.amp.GradScaler`` to use for ``"16-mixed"`` (one is made if omitted).

    Raises:
        ValueError: Another precision was named, or a scaler was given for ``"bf16-mixed"``.
    """

    def __init__(
        self,
        precision: Literal["16-mixed", "bf16-mixed"],
        device: str,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if precision not in ("16-mixed", "bf16-mixed"):
            raise ValueError(
                f"MixedPrecision(precision={precision!r}) is not a mixed precision."
                " Pass '16-mixed' or 'bf16-mixed'."
            )
        if scaler is not None and precision == "bf16-mixed":
            raise ValueError(
                f"MixedPrecision(precision='bf16-mixed', scaler={scaler!r}): bfloat16 needs no gradient"
                " scaler. Drop the scaler, or use precision='16-mixed'."
            )
        self.precision = precision
        self.device = device
        self.dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        if scaler is None and precision == "16-mixed":
            scaler = torch.amp.GradScaler(device)
        self._init_scaler(scaler)

    @override
    def forward_context(self) -> AbstractContextManager[Any]:
        return torch.autocast(self.device, dtype=self.dtype)

    @override
    def wrap_forward(self, call: Callable[..., Any]) -> Callable[..., Any]:
        if type(self) is not MixedPrecision:  # a subclass may override any hook: the general path
            return super().wrap_forward(call)
        device, dtype = self.device, self.dtype

        def mixed_forward(*args: Any, **kwargs: Any) -> Any:  # the same steps, without the walks
            args, kwargs = cast_arguments(args, kwargs, dtype)
            with torch.autocast(device, dtype=dtype):
                output = call(*args, **kwargs)
            return to_default_dtype(output)

        return mixed_forward
