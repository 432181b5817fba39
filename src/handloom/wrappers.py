"""What ``fabric.setup*`` returns: thin wrappers around the user's module, optimizer and loader."""

from __future__ import annotations

import copy
import inspect
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader
from typing_extensions import override

from handloom.apply import move_data_to_device
from handloom.device_dtype import _DeviceDtypeModuleMixin
from handloom.strategies.base import Strategy

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from handloom.plugins.precision import Precision

# Wrapper attributes that live on the wrapper itself; everything else belongs to the wrapped object.
_MODULE_OWN = frozenset(
    {
        "_forward_module",
        "_original_module",
        "_strategy",
        "_amp",
        "_call",
        "_forward_call",
        "_forward_methods",
        "_device",
        "_dtype",
    }
)
# Derived from the rest in __init__ and __setstate__, so never pickled or copied.
_MODULE_CALLS = ("_call", "_forward_call")
_AUTO_FORWARD_METHODS = ("training_step", "validation_step", "test_step", "predict_step")


class _FabricModule(_DeviceDtypeModuleMixin):
    """The set-up model: runs the forward pass through the strategy's wrapper and the precision.

    ``.device`` and ``.dtype`` are Lightning's: the device Fabric moved the model to (where its
    parameters are, with ``move_to_device=False``) and the dtype of its parameters at set-up, both
    following later ``.to()``, ``.cuda()``, ``.cpu()``, ``.half()``, ``.double()``, ``.float()``.

    ``state_dict``/``load_state_dict`` act on the original module (no ``module.`` prefix), unknown
    attributes are read from and written to the original module, and calling the wrapper costs
    one extra Python call for ``32-true``. Hooks registered on the wrapper fire as on any module
    (pre-hooks see the inputs before the precision casts them); calls take nn.Module's hook
    dispatch only once one is registered.

    Under a strategy that wraps the forward pass (DDP, FSDP), another method that runs the model
    must be marked with :meth:`mark_forward_method`; unmarked, it raises when it calls the model
    or one of its submodules.
    """

    _strategy: Strategy
    _amp: Precision
    _forward_methods: set[str]
    _call: Callable[..., Any]
    _forward_call: Callable[..., Any]

    def __init__(self, forward_module: torch.nn.Module, original_module: torch.nn.Module, strategy: Strategy):
        super().__init__()
        self._forward_module = forward_module
        self._original_module = original_module
        object.__setattr__(self, "_strategy", strategy)
        # Held apart from the strategy, which is unbound in another process: a pickled model still
        # runs in its precision there.
        object.__setattr__(self, "_amp", strategy.amp)
        object.__setattr__(self, "_forward_methods", set(_AUTO_FORWARD_METHODS))
        self._dtype = _parameter_dtype(original_module)
        self._build_calls()
        for name in _AUTO_FORWARD_METHODS:
            if callable(getattr(original_module, name, None)):
                strategy.register_forward_method(forward_module, name)

    def _build_calls(self) -> None:
        # The forward path is decided here, once: a direct call for 32-true.
        forward_call = self._amp.wrap_forward(self._forward_module.__call__)
        object.__setattr__(self, "_forward_call", forward_call)
        object.__setattr__(self, "_call", self._hooked_call if self._has_hooks() else forward_call)

    # Without hooks on the wrapper, calling it skips nn.Module's hook dispatch.
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module's forward pass in the precision."""
        return self._forward_call(*args, **kwargs)

    # --- hooks on the wrapper -------------------------------------------------------------------
    def _has_hooks(self) -> bool:
        return bool(
            self._forward_pre_hooks or self._forward_hooks or self._backward_pre_hooks or self._backward_hooks
        )

    def _hooked_call(self, *args: Any, **kwargs: Any) -> Any:
        if not self._has_hooks():  # all removed: back to the direct call from the next call on
            object.__setattr__(self, "_call", self._forward_call)
        return torch.nn.Module.__call__(self, *args, **kwargs)

    def _use_hooks(self, handle: RemovableHandle) -> RemovableHandle:
        object.__setattr__(self, "_call", self._hooked_call)
        return handle

    @override
    def register_forward_pre_hook(self, *args: Any, **kwargs: Any) -> RemovableHandle:
        """Register a hook called with the wrapper and its inputs (before the precision casts them)."""
        return self._use_hooks(super().register_forward_pre_hook(*args, **kwargs))

    @override
    def register_forward_hook(self, *args: Any, **kwargs: Any) -> RemovableHandle:
        """Register a hook called with the wrapper, its inputs and its output (it may replace the output)."""
        return self._use_hooks(super().register_forward_hook(*args, **kwargs))

    @override
    def register_full_backward_pre_hook(self, *args: Any, **kwargs: Any) -> RemovableHandle:
        """Register a hook called with the gradients of the wrapper's output."""
        return self._use_hooks(super().register_full_backward_pre_hook(*args, **kwargs))

    @override
    def register_full_backward_hook(self, *args: Any, **kwargs: Any) -> RemovableHandle:
        """Register a hook called with the gradients of the wrapper's inputs and output."""
        return self._use_hooks(super().register_full_backward_hook(*args, **kwargs))

    @override
    def register_backward_hook(self, *args: Any, **kwargs: Any) -> RemovableHandle:
        """Deprecated in torch: use :meth:`register_full_backward_hook`."""
        return self._use_hooks(super().register_backward_hook(*args, **kwargs))

    # --- state ----------------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        """The original, unwrapped module."""
        return self._original_module

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The original module's state dict (keys without any wrapper prefix).

        For a sharded model (FSDP, tensor parallel) it holds DTensor shards, as with Lightning's
        ``ModelParallelStrategy``; ``fabric.save`` with ``state_dict_type="full"`` or
        ``handloom consolidate`` give full weights.
        """
        return self._original_module.state_dict(*args, **kwargs)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load into the original module.

        On a sharded model, a full state dict (plain tensors, e.g. ``torch.load`` of a consolidated
        file) is distributed onto the shards; one from ``model.state_dict()`` loads as it is.

        Raises:
            ValueError: ``assign=True`` with a full state dict for a sharded model.
        """
        original = self._original_module
        if not _full_for_sharded(original, state_dict):
            return original.load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:
            raise ValueError(
                "model.load_state_dict(state_dict, assign=True) got full tensors for a sharded model:"
                " assigning them would replace its shards with whole tensors. Pass assign=False, which"
                " copies each rank's part of the full tensors into its shards."
            )
        return load_full_state_dict(original, state_dict, strict)

    # --- methods other than forward -------------------------------------------------------------
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

    def _marked(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        if self._forward_module is not self._original_module:
            return self._redirected(name)
        if self._strategy.wraps_forward:  # sharded in place: the strategy registered the method
            return self._amp.wrap_forward(method)
        return method  # one device: a plain call, as in Lightning

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

    def _guarded(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        """``method``, raising as soon as it calls the model or a submodule outside the strategy's wrapper."""
        original = self._original_module
        strategy = self._strategy.name

        def call(*args: Any, **kwargs: Any) -> Any:
            from torch.nn.modules.module import register_module_forward_pre_hook

            members: set[int] = set()  # the model's modules, listed once the method calls a module

            def check(module: torch.nn.Module, _args: Any) -> None:
                if not members:
                    members.update(map(id, original.modules()))
                if id(module) in members:
                    raise RuntimeError(
                        f"model.{name}() ran {type(module).__name__}.forward outside the {strategy!r}"
                        " strategy's wrapper, so the gradients it produces would not be synchronised"
                        f" across processes. Call model.mark_forward_method({name!r}) after fabric.setup()"
                        f" to run {type(original).__name__}.{name}() through the wrapper."
                    )

            # A global hook for the call's duration, instead of one hook per submodule.
            handle = register_module_forward_pre_hook(check)
            try:
                return method(*args, **kwargs)
            finally:
                handle.remove()

        return call

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        modules = self.__dict__.get("_modules")
        if modules is None or "_original_module" not in modules:
            raise AttributeError(name)  # not set up yet: being copied or unpickled
        attr = getattr(modules["_original_module"], name)
        if name in self._forward_methods and callable(attr):
            return self._marked(name, attr)
        if self._strategy.wraps_forward and inspect.ismethod(attr):
            return self._guarded(name, attr)
        return attr

    def __setattr__(self, name: str, value: Any) -> None:
        if "_original_module" not in self._modules or name in _MODULE_OWN or name == "training":
            super().__setattr__(name, value)
            return
        original = self._original_module
        setattr(original, name, value)
        if hasattr(type(self), name) or name in self.__dict__:
            super().__setattr__(name, value)

    # --- copies ---------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()  # type: ignore[no-untyped-call]  # torch's, untyped
        for name in _MODULE_CALLS:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]  # torch's, untyped
        self._build_calls()

    def __deepcopy__(self, memo: dict[int, Any]) -> _FabricModule:
        # The strategy and the precision runner belong to this process (process group, gradient
        # scaler): the copy shares them and deep-copies the model.
        memo[id(self._strategy)] = self._strategy
        memo[id(self._amp)] = self._amp
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return copied

    def __repr__(self) -> str:
        return f"_FabricModule({self._original_module!r})"


def _parameter_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (torch's default dtype if none)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.get_default_dtype()


def parameter_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (a DTensor's local device), or the CPU without any."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def load_full_state_dict(module: torch.nn.Module, state_dict: Mapping[str, Any], strict: bool) -> Any:
    """Copy each rank's part of the full tensors in ``state_dict`` into ``module``'s shards.

    Returns:
        torch's ``(missing_keys, unexpected_keys)`` result.

    Raises:
        RuntimeError: ``strict`` and ``state_dict`` lacks keys of ``module`` (torch's
            ``set_model_state_dict`` would keep their current values and report nothing).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    missing = [key for key in module.state_dict() if key not in state_dict]
    if strict and missing:
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(module).__name__}:\n\tMissing key(s) in"
            f" state_dict: {', '.join(repr(key) for key in missing)}."
        )
    options = StateDictOptions(full_state_dict=True, strict=strict)
    result = set_model_state_dict(module, dict(state_dict), options=options)
    return result._replace(missing_keys=[*missing, *result.missing_keys])


def _full_for_sharded(module: torch.nn.Module, state_dict: Mapping[str, Any]) -> bool:
    """True when ``state_dict`` holds a plain tensor where ``module`` holds a DTensor."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        if isinstance(tensor, DTensor):
            value = state_dict.get(name)
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
                return True
    return False


# "step" stays on the wrapper: an LR scheduler built on the set-up optimizer replaces ``step`` with
# a tracking wrapper of it, which must not land on the original (its step would call itself).
_OPTIMIZER_OWN = frozenset({"_optimizer", "_strategy", "_callbacks", "step"})


class _FabricOptimizer:
    """The set-up optimizer: ``step`` goes through the precision (gradient scaler) and callbacks.

    Its class is a subclass of the original optimizer's class, so ``isinstance`` checks still hold;
    ``param_groups``, ``state`` and ``defaults`` are the original's. ``copy.copy`` gives a wrapper
    of the same optimizer, ``copy.deepcopy`` one of an independent copy, and it pickles.
    """

    _optimizer: torch.optim.Optimizer
    _strategy: Strategy
    _callbacks: list[tuple[Callable[..., Any], dict[str, Any]]]

    def __init__(self, optimizer: torch.optim.Optimizer, strategy: Strategy, callbacks: list[Any]) -> None:
        from handloom.validation import accepted_kwargs  # validation imports this module

        # The hook's arguments never change, so they are matched to its signature once, here.
        everything = {"strategy": strategy, "optimizer": optimizer}
        hooks = [cb.on_after_optimizer_step for cb in callbacks if hasattr(cb, "on_after_optimizer_step")]
        matched = [(hook, accepted_kwargs(hook, everything)) for hook in hooks]
        _bind_optimizer(self, optimizer, strategy, matched)

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
        amp = self._strategy.amp
        if closure is None:
            output = amp.optimizer_step(self._optimizer)
        else:
            output = amp.optimizer_step(self._optimizer, closure=closure)
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
        optimizer = self.__dict__.get("_optimizer")
        if optimizer is None:
            raise AttributeError(name)  # not set up yet: being copied or unpickled
        return getattr(optimizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        own = name in _OPTIMIZER_OWN or name == "__class__"
        if own or isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
        else:
            setattr(self._optimizer, name, value)

    def __copy__(self) -> _FabricOptimizer:
        return _rebuild_optimizer(self._optimizer, self._strategy, self._callbacks)

    def __deepcopy__(self, memo: dict[int, Any]) -> _FabricOptimizer:
        # The strategy and the callbacks are shared; the optimizer, its state and groups are copied.
        optimizer = copy.deepcopy(self._optimizer, memo)
        callbacks = [
            (hook, {key: optimizer if value is self._optimizer else value for key, value in kwargs.items()})
            for hook, kwargs in self._callbacks
        ]
        return _rebuild_optimizer(optimizer, self._strategy, callbacks)

    def __reduce__(self) -> tuple[Any, ...]:
        # The class is made per wrapper, so pickle rebuilds it rather than looking it up by name.
        return _rebuild_optimizer, (self._optimizer, self._strategy, self._callbacks)

    def __repr__(self) -> str:
        return f"Fabric{self._optimizer!r}"


def _bind_optimizer(
    wrapper: _FabricOptimizer,
    optimizer: torch.optim.Optimizer,
    strategy: Strategy,
    callbacks: list[tuple[Callable[..., Any], dict[str, Any]]],
) -> None:
    object.__setattr__(wrapper, "_optimizer", optimizer)
    object.__setattr__(wrapper, "_strategy", strategy)
    object.__setattr__(wrapper, "_callbacks", callbacks)
    cls = type(optimizer)
    wrapper.__class__ = type(f"Fabric{cls.__name__}", (_FabricOptimizer, cls), {})


def _rebuild_optimizer(
    optimizer: torch.optim.Optimizer,
    strategy: Strategy,
    callbacks: list[tuple[Callable[..., Any], dict[str, Any]]],
) -> _FabricOptimizer:
    """A set-up optimizer around ``optimizer`` with callbacks already matched (copies, unpickling)."""
    wrapper = object.__new__(_FabricOptimizer)
    _bind_optimizer(wrapper, optimizer, strategy, callbacks)
    return wrapper


class _FabricDataLoader:
    """The set-up loader: sets the sampler's epoch on each pass and moves batches to the device.

    It also counts the batches handed out in the current pass: put the loader itself in
    ``fabric.save``'s state and the checkpoint records where it stands, so a ``fabric.load`` with
    it in the state continues from there (:mod:`handloom.data_resume`). A DataLoader with its own
    ``state_dict`` is saved and restored through it instead. Attributes of the DataLoader
    (``dataset``, ``batch_size``, ``sampler``, ...) read through.
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
