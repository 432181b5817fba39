"""Create modules without running their weight initialisation."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch.overrides import TorchFunctionMode


class _SkipInit(TorchFunctionMode):
    """Turns every ``torch.nn.init`` function into a no-op that returns its tensor.

    Parameters are still allocated (with ``torch.empty``), so their values are undefined until
    weights are loaded: meant for ``fabric.init_module(empty_init=True)`` followed by a load.
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def skip_init_context() -> TorchFunctionMode:
    """A context in which ``torch.nn.init`` functions leave tensors uninitialised."""
    return _SkipInit()
