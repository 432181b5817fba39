"""Realise a precision policy for single-device and DDP training: autocast and gradient scaling."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch

from handloom.apply import apply_to_tensors
from handloom.precision import PrecisionPolicy


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


class AmpRunner:
    """Autocast, dtype conversion and the gradient scaler for one process.

    Args:
        policy: The precision policy.
        device_type: ``"cpu"``, ``"cuda"`` or ``"mps"``: where autocast and the scaler run.
    """

    def __init__(self, policy: PrecisionPolicy, device_type: str) -> None:
        self.policy = policy
        self.device_type = device_type
        self.scaler: torch.amp.GradScaler | None = (
            torch.amp.GradScaler(device_type) if policy.grad_scaling else None
        )
        # Scaled backward passes so far, and per optimizer (by id) the count at its last step: an
        # optimizer may step once per backward, and several optimizers may share one backward.
        self._num_backwards = 0
        self._stepped_at: dict[int, int] = {}
        self._unscaled: set[int] = set()
        self._update_pending = False

    def state_dict(self) -> dict[str, Any]:
        """The gradient scaler's state (``{}`` without a scaler), for a checkpoint."""
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the gradient scaler from :meth:`state_dict`; nothing to do without a scaler."""
        if self.scaler is not None and state_dict:
            self.scaler.load_state_dict(state_dict)

    def forward_context(self) -> AbstractContextManager[Any]:
        """The context a forward pass runs in: autocast for ``*-mixed``, a default dtype for ``*-true``."""
        if self.policy.compute_dtype is not None:
            return torch.autocast(self.device_type, dtype=self.policy.compute_dtype)
        if self.policy.param_dtype is not None:
            return default_dtype(self.policy.param_dtype)
        return contextlib.nullcontext()

    def init_context(self) -> AbstractContextManager[Any]:
        """The context tensors and modules are created in: the parameter dtype for ``*-true``."""
        if self.policy.param_dtype is not None:
            return default_dtype(self.policy.param_dtype)
        return contextlib.nullcontext()

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Cast floating-point parameters and buffers for ``*-true`` precisions; leave them alone otherwise.

        Complex and integer tensors keep their dtype, as with ``module.double()`` or ``module.half()``
        (``module.to(dtype=...)`` would also cast complex tensors and drop their imaginary part).
        """
        dtype = self.policy.param_dtype
        if dtype is None:
            return module
        return _REAL_CASTS[dtype](module)

    def convert_input(self, data: Any) -> Any:
        """Cast floating-point inputs to the parameter dtype for ``*-true`` precisions."""
        dtype = self.policy.param_dtype
        if dtype is None:
            return data
        return apply_to_tensors(data, lambda t: t.to(dtype) if t.is_floating_point() else t)

    def convert_output(self, data: Any) -> Any:
        """Cast floating-point outputs back to torch's default dtype, so losses run in full precision."""
        target = torch.get_default_dtype()

        def cast(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(target) if tensor.is_floating_point() and tensor.dtype != target else tensor

        if type(data) is torch.Tensor:  # the common case, without walking a collection
            return cast(data)
        return apply_to_tensors(data, cast)

    def wrap_forward(self, call: Callable[..., Any]) -> Callable[..., Any]:
        """Return ``call`` run under this precision: ``call`` itself for ``32-true``."""
        policy = self.policy
        if policy.is_default:
            return call
        if policy.compute_dtype is not None:
            device_type, compute_dtype = self.device_type, policy.compute_dtype

            def mixed_forward(*args: Any, **kwargs: Any) -> Any:
                with torch.autocast(device_type, dtype=compute_dtype):
                    output = call(*args, **kwargs)
                return self.convert_output(output)

            return mixed_forward

        def true_forward(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = self.convert_input((args, kwargs))
            with self.forward_context():
                output = call(*args, **kwargs)
            return self.convert_output(output)

        return true_forward

    def backward(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Run backward, scaling the loss first when a gradient scaler is in use."""
        if self.scaler is not None:
            if self._update_pending:  # an unscaled optimizer was never stepped: the step is over
                self._update()
            torch.autograd.backward(self.scaler.scale(tensor), *args, **kwargs)
            self._num_backwards += 1
        else:
            torch.autograd.backward(tensor, *args, **kwargs)

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients of ``optimizer`` by the loss scale (once per step)."""
        if self.scaler is None:
            return
        if id(optimizer) in self._unscaled:
            return
        self.scaler.unscale_(optimizer)
        self._unscaled.add(id(optimizer))

    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None) -> Any:
        """Step ``optimizer``; with a scaler, skip steps whose gradients overflowed and update the scale."""
        if self.scaler is None:
            return optimizer.step(closure) if closure is not None else optimizer.step()
        if closure is not None:
            raise TypeError(
                f"optimizer.step(closure) cannot be used with precision={self.policy.name!r}: the gradient"
                " scaler needs the backward pass to happen before the step. Use precision='bf16-mixed' or"
                " '32-true' for closure-based optimizers such as LBFGS."
            )
        if self._stepped_at.get(id(optimizer), 0) == self._num_backwards:
            raise RuntimeError(
                f"optimizer.step() was called without fabric.backward(loss) since this optimizer's last"
                f" step. With precision={self.policy.name!r} the loss must be scaled: replace"
                " loss.backward() with fabric.backward(loss)."
            )
        result = self.scaler.step(optimizer)
        self._stepped_at[id(optimizer)] = self._num_backwards
        self._unscaled.discard(id(optimizer))
        # As in Lightning, the scale is updated after each optimizer's step, except while another
        # optimizer was already unscaled (clipped) for this step and has not stepped: an update now
        # would make the scaler unscale its gradients a second time, with the new scale.
        self._update_pending = True
        if not self._unscaled:
            self._update()
        return result

    def _update(self) -> None:
        assert self.scaler is not None
        self.scaler.update()
        self._update_pending = False
        self._unscaled.clear()
