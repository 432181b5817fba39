"""What ``fabric.setup*`` returns: thin wrappers around the user's module, optimizer and loader."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from handloom.apply import move_data_to_device
from handloom.strategies.base import Strategy

# Wrapper attributes that live on the wrapper itself; everything else belongs to the wrapped object.
_MODULE_OWN = frozenset({"_forward_module", "_original_module", "_strategy", "_call", "_forward_methods"})
_AUTO_FORWARD_METHODS = ("training_step", "validation_step", "test_step", "predict_step")


class _FabricModule(torch.nn.Module):
    """The set-up model: runs the forward pass through the strategy's wrapper and the precision.

    ``state_dict``/``load_state_dict`` act on the original module (no ``module.`` prefix), unknown
    attributes are read from and written to the original module, and calling the wrapper costs
    one extra Python call for ``32-true``.
    """

    _strategy: Strategy
    _forward_methods: set[str]
    _call: Callable[..., Any]

    def __init__(self, forward_module: torch.nn.Module, original_module: torch.nn.Module, strategy: Strategy):
        super().__init__()
        self._forward_module = forward_module
        self._original_module = original_module
        object.__setattr__(self, "_strategy", strategy)
        object.__setattr__(self, "_forward_methods", set(_AUTO_FORWARD_METHODS))
        # The forward path is decided here, once: a direct call for 32-true.
        object.__setattr__(self, "_call", strategy.amp.wrap_forward(forward_module.__call__))
        for name in _AUTO_FORWARD_METHODS:
            if callable(getattr(original_module, name, None)):
                strategy.register_forward_method(forward_module, name)

    # Calling the wrapper skips nn.Module's hook dispatch: hooks belong on the user's own module.
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module's forward pass."""
        return self._call(*args, **kwargs)

    @property
    def module(self) -> torch.nn.Module:
        """The original, unwrapped module."""
        return self._original_module

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The original module's state dict (keys without any wrapper prefix)."""
        return self._original_module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load into the original module."""
        return self._original_module.load_state_dict(state_dict, strict=strict, assign=assign)

    def mark_forward_method(self, method: str | Callable[..., Any]) -> None:
        """Route calls of another method (e.g. ``generate``) through the strategy wrapper and precision.

        Raises:
            ValueError: ``method`` is ``"forward"``.
            AttributeError: The module has no such method.
        """
        name = method if isinstance(method, str) else method.__name__
        if name == "forward":
            raise ValueError("mark_forward_method('forward') is not needed: forward is always redirected.")
        if not callable(getattr(self._original_module, name, None)):
            owner = type(self._original_module).__name__
            raise AttributeError(
                f"mark_forward_method({name!r}): {owner} has no method {name!r}. Check the spelling,"
                f" or define {name}() on {owner} before marking it."
            )
        self._forward_methods.add(name)
        self._strategy.register_forward_method(self._forward_module, name)

    def _redirected(self, name: str) -> Callable[..., Any]:
        original = self._original_module

        def call(*args: Any, **kwargs: Any) -> Any:
            had_own = "forward" in original.__dict__
            saved = original.__dict__.get("forward")

            def restore() -> None:
                if had_own:
                    object.__setattr__(original, "forward", saved)
                elif "forward" in original.__dict__:
                    object.__delattr__(original, "forward")

            def run_method(*inner_args: Any, **inner_kwargs: Any) -> Any:
                # The strategy's wrapper is calling "forward": put the real forward back before the
                # method runs, since the method may call self(...) itself.
                restore()
                return getattr(original, name)(*inner_args, **inner_kwargs)

            object.__setattr__(original, "forward", run_method)
            try:
                return self._call(*args, **kwargs)
            finally:
                restore()

        return call

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        original = self._modules["_original_module"]
        redirect = name in self.__dict__.get("_forward_methods", ()) and self._forward_module is not original
        if redirect and callable(getattr(original, name, None)):
            return self._redirected(name)
        return getattr(original, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if "_original_module" not in self._modules or name in _MODULE_OWN or name == "training":
            super().__setattr__(name, value)
            return
        original = self._original_module
        setattr(original, name, value)
        if hasattr(type(self), name) or name in self.__dict__:
            super().__setattr__(name, value)

    def __repr__(self) -> str:
        return f"_FabricModule({self._original_module!r})"


# "step" stays on the wrapper: an LR scheduler built on the set-up optimizer replaces ``step`` with
# a tracking wrapper of it, which must not land on the original (its step would call itself).
_OPTIMIZER_OWN = frozenset({"_optimizer", "_strategy", "_callbacks", "step"})


class _FabricOptimizer:
    """The set-up optimizer: ``step`` goes through the precision (gradient scaler) and callbacks.

    Its class is a subclass of the original optimizer's class, so ``isinstance`` checks still hold;
    ``param_groups``, ``state`` and ``defaults`` are the original's.
    """

    _optimizer: torch.optim.Optimizer
    _strategy: Strategy
    _callbacks: list[tuple[Callable[..., Any], dict[str, Any]]]

    def __init__(self, optimizer: torch.optim.Optimizer, strategy: Strategy, callbacks: list[Any]) -> None:
        object.__setattr__(self, "_optimizer", optimizer)
        object.__setattr__(self, "_strategy", strategy)
        from handloom.validation import accepted_kwargs  # validation imports this module

        # The hook's arguments never change, so they are matched to its signature once, here.
        everything = {"strategy": strategy, "optimizer": optimizer}
        hooks = [cb.on_after_optimizer_step for cb in callbacks if hasattr(cb, "on_after_optimizer_step")]
        object.__setattr__(self, "_callbacks", [(hook, accepted_kwargs(hook, everything)) for hook in hooks])
        cls = type(optimizer)
        self.__class__ = type(f"Fabric{cls.__name__}", (_FabricOptimizer, cls), {})

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The original optimizer."""
        return self._optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The original optimizer's parameter groups."""
        groups: list[dict[str, Any]] = self._optimizer.param_groups
        return groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._optimizer.param_groups = value

    @property
    def state(self) -> Any:
        """The original optimizer's state."""
        return self._optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self._optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        """The original optimizer's defaults."""
        defaults: dict[str, Any] = self._optimizer.defaults
        return defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._optimizer.defaults = value

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take an optimizer step (skipped by the gradient scaler when fp16 gradients overflowed)."""
        output = self._strategy.amp.optimizer_step(self._optimizer, closure)
        for hook, kwargs in self._callbacks:
            hook(**kwargs)
        return output

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of the original optimizer's parameters."""
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The original optimizer's state dict."""
        state: dict[str, Any] = self._optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the original optimizer."""
        self._optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the original optimizer."""
        self._optimizer.add_param_group(param_group)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        own = name in _OPTIMIZER_OWN or name == "__class__"
        if own or isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
        else:
            setattr(self._optimizer, name, value)

    def __repr__(self) -> str:
        return f"Fabric{self._optimizer!r}"


class _FabricDataLoader:
    """The set-up loader: sets the sampler's epoch on each pass and moves batches to the device.

    It also counts the batches handed out in the current pass, so a checkpoint can record where
    the loader stands and a resumed run can continue from there (:mod:`handloom.data_resume`).
    Attributes of the DataLoader (``dataset``, ``batch_size``, ``sampler``, ...) read through.
    """

    _OWN = frozenset(
        ("_dataloader", "_device", "_num_iter_calls", "_position", "_finished", "_snapshot", "_resume")
    )

    def __init__(self, dataloader: DataLoader[Any], device: torch.device | None) -> None:
        self._dataloader = dataloader
        self._device = device
        self._num_iter_calls = 0
        self._position = 0
        self._finished = False
        self._snapshot: dict[str, Any] | None = None
        self._resume: tuple[int, dict[str, Any]] | None = None

    @property
    def device(self) -> torch.device | None:
        """Where batches are moved, or ``None`` when they are left where the loader puts them."""
        return self._device

    @property
    def dataloader(self) -> DataLoader[Any]:
        """The underlying DataLoader."""
        return self._dataloader

    def __len__(self) -> int:
        return len(self._dataloader)

    def __iter__(self) -> Iterator[Any]:
        from handloom import data_resume
        from handloom.data import set_sampler_epoch

        set_sampler_epoch(self._dataloader, self._num_iter_calls)
        self._num_iter_calls += 1
        self._position = 0
        self._finished = False
        resume, self._resume = self._resume, None
        if resume is not None:
            position, self._snapshot = resume
            self._position = position
            iterator = data_resume.resume_pass(self._dataloader, position, self._snapshot)
        else:
            self._snapshot = data_resume.pass_snapshot(self._dataloader)
            iterator = iter(self._dataloader)
        return self._counting(iterator, self._num_iter_calls)

    def _counting(self, iterator: Iterator[Any], pass_number: int) -> Iterator[Any]:
        device = self._device
        try:
            for batch in iterator:
                self._position += 1
                yield batch if device is None else move_data_to_device(batch, device)
        finally:
            # Exhausted, or abandoned (a `break` drops the iterator, which closes it): either way
            # the next pass starts afresh. Only a pass still being iterated is resumed mid-way.
            if pass_number == self._num_iter_calls:
                self._finished = True

    def progress_state(self) -> dict[str, Any]:
        """Where this loader stands: passes started, batches handed out in the current one, ..."""
        return {
            "passes": self._num_iter_calls,
            "position": self._position,
            "finished": self._finished or self._num_iter_calls == 0,
            "length": _length_or_none(self._dataloader),
            "snapshot": self._snapshot,
        }

    def restore_progress(self, state: Mapping[str, Any], *, saved_world_size: int, world_size: int) -> None:
        """Continue from ``state``: the next pass re-enters the interrupted one where it stopped."""
        passes = int(state["passes"])
        if state["finished"] or state["snapshot"] is None:
            self._num_iter_calls = passes
            self._resume = None
            return
        position = int(state["position"])
        if saved_world_size != world_size:
            # Batches are per rank; keep the number of samples consumed across all ranks.
            position = position * saved_world_size // world_size
        self._num_iter_calls = passes - 1
        self._resume = (position, state["snapshot"])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in _FabricDataLoader._OWN:
            raise AttributeError(name)
        return getattr(self._dataloader, name)


def _length_or_none(loader: DataLoader[Any]) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def compiled_original(module: torch.nn.Module) -> torch.nn.Module | None:
    """The module inside a ``torch.compile(module)`` result, or ``None`` for any other module.

    ``torch.compile`` returns an ``OptimizedModule`` holding the original as ``_orig_mod``; it is
    recognised by that without importing torch's private dynamo package.
    """
    original = module.__dict__.get("_orig_mod") or module._modules.get("_orig_mod")
    if type(module).__name__ == "OptimizedModule" and isinstance(original, torch.nn.Module):
        return original
    return None


def is_wrapped(obj: object) -> bool:
    """True if ``obj`` was returned by one of Fabric's ``setup`` methods."""
    return isinstance(obj, (_FabricModule, _FabricOptimizer, _FabricDataLoader))


def unwrap(obj: Any) -> Any:
    """Return the user's original object behind a Fabric wrapper (or ``obj`` itself)."""
    if isinstance(obj, _FabricModule):
        return obj.module
    if isinstance(obj, _FabricOptimizer):
        return obj.optimizer
    if isinstance(obj, _FabricDataLoader):
        return obj.dataloader
    return obj
