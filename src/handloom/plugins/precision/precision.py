"""The precision plugin protocol: how a module, its inputs and outputs, backward and steps are treated.

:class:`Precision` is Lightning's plugin interface with its default behaviour, full 32-bit precision.
Subclasses (handloom's built-in ones, or a user's own written for Lightning) override parts of it;
handloom calls only these methods, so a user's plugin passed to ``Fabric(plugins=[...])`` is honoured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from typing_extensions import override

from handloom.amp import cast_floating, to_default_dtype


class Precision:
    """Full precision (``"32-true"``) and the interface every precision plugin follows.

    ``precision`` names the choice; the methods are hooks Fabric calls at set-up (``convert_module``),
    while building models and tensors (``module_init_context``, ``tensor_init_context``), around each
    forward pass of a set-up module (``convert_input``, ``forward_context``, ``convert_output``), in
    ``fabric.backward`` (``pre_backward``, ``backward``, ``post_backward``), in ``optimizer.step``
    (``optimizer_step``), and in ``fabric.clip_gradients`` (``unscale_gradients``, ``main_params``).
    ``state_dict``/``load_state_dict`` let the plugin ride in ``fabric.save``'s state.
    """

    precision: str = "32-true"

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Return the module converted to this precision (at set-up). Full precision keeps it."""
        return module

    def tensor_init_context(self) -> AbstractContextManager[Any]:
        """The context ``fabric.init_tensor()`` creates tensors in."""
        return nullcontext()

    def module_init_context(self) -> AbstractContextManager[Any]:
        """The context ``fabric.init_module()`` builds modules in."""
        return nullcontext()

    def forward_context(self) -> AbstractContextManager[Any]:
        """The context a set-up module's forward pass (and ``fabric.autocast()``) runs in."""
        return nullcontext()

    def convert_input(self, data: Any) -> Any:
        """Convert the forward pass's inputs (``(args, kwargs)``) to this precision."""
        return data

    def convert_output(self, data: Any) -> Any:
        """Convert the forward pass's outputs for the code that consumes them (the loss)."""
        return data

    def pre_backward(self, tensor: torch.Tensor, module: torch.nn.Module | None) -> Any:
        """Called before :meth:`backward`."""

    def backward(
        self, tensor: torch.Tensor, model: torch.nn.Module | None, *args: Any, **kwargs: Any
    ) -> None:
        """Run the backward pass of ``tensor``; ``args``/``kwargs`` go to ``Tensor.backward``."""
        tensor.backward(*args, **kwargs)  # type: ignore[no-untyped-call]

    def post_backward(self, tensor: torch.Tensor, module: torch.nn.Module | None) -> Any:
        """Called after :meth:`backward`."""

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        """Step ``optimizer`` (``kwargs`` holds the closure when one was given)."""
        return optimizer.step(**kwargs)

    def main_params(self, optimizer: torch.optim.Optimizer) -> Iterator[torch.nn.Parameter]:
        """The parameters whose gradients are clipped: those of ``optimizer``."""
        for group in optimizer.param_groups:
            yield from group["params"]

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring ``optimizer``'s gradients to their true scale (a no-op without a gradient scaler)."""

    def state_dict(self) -> dict[str, Any]:
        """The plugin's state for a checkpoint (``{}`` when it has none)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state from :meth:`state_dict`."""

    def teardown(self) -> None:
        """Release what the plugin holds at the end of training."""

    # --- handloom's use of the hooks ------------------------------------------------------------
    def wrap_forward(self, call: Callable[..., Any]) -> Callable[..., Any]:
        """Return ``call`` between :meth:`convert_input`, :meth:`forward_context`, :meth:`convert_output`.

        Decided once per set-up module: a plugin that overrides none of the three gets ``call``
        itself back, so full precision costs nothing per step.
        """
        cls = type(self)
        if (
            cls.convert_input is Precision.convert_input
            and cls.forward_context is Precision.forward_context
            and cls.convert_output is Precision.convert_output
        ):
            return call

        def forward_in_precision(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = self.convert_input((args, kwargs))
            with self.forward_context():
                output = call(*args, **kwargs)
            return self.convert_output(output)

        return forward_in_precision

    def run_backward(
        self, tensor: torch.Tensor, module: torch.nn.Module | None, *args: Any, **kwargs: Any
    ) -> None:
        """``fabric.backward``: :meth:`pre_backward`, :meth:`backward`, :meth:`post_backward`."""
        self.pre_backward(tensor, module)
        self.backward(tensor, module, *args, **kwargs)
        self.post_backward(tensor, module)

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The gradient scaler in use, or ``None``."""
        scaler = getattr(self, "scaler", None)
        return scaler if isinstance(scaler, torch.amp.GradScaler) else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(precision={self.precision!r})"


class _CastingPrecision(Precision):
    """Inputs cast to :attr:`dtype`, floating-point outputs back to torch's default dtype."""

    dtype: torch.dtype

    @override
    def convert_input(self, data: Any) -> Any:
        return cast_floating(data, self.dtype)

    @override
    def convert_output(self, data: Any) -> Any:
        return to_default_dtype(data)
