"""Checks of what users pass to Fabric's methods, each raising an error that says what to do."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from typing import Any

import torch

from handloom.wrappers import _FabricModule, _FabricOptimizer, unwrap


def as_list(value: Any) -> list[Any]:
    """``None`` -> ``[]``, a list or tuple -> a list, anything else -> ``[value]``."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def describe(value: object, limit: int = 60) -> str:
    """``value`` as a user would recognise it in an error message: its repr on one line, shortened.

    A repr that spans several lines (a model) becomes ``Net(...)``.
    """
    text = repr(value)
    if "\n" in text:
        text = f"{type(value).__name__}(...)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_module(module: object, already_set_up: Collection[Any]) -> None:
    """Reject a model that is not a module or was set up before.

    Raises:
        ValueError: Already set up.
        TypeError: Not a ``torch.nn.Module``.
    """
    if isinstance(module, _FabricModule) or module in already_set_up:
        raise ValueError(
            f"fabric.setup({type(unwrap(module)).__name__}) got a model that is already set up."
            " Set up each model once and keep using the object setup returned."
        )
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"fabric.setup({describe(module)}) needs a torch.nn.Module as its first argument, got type"
            f" {type(module).__name__}. Pass the model first and its optimizers after it:"
            " model, optimizer = fabric.setup(model, optimizer)."
        )


def check_optimizer(optimizer: object, already_set_up: Collection[Any]) -> None:
    """Reject an optimizer that is not an optimizer or was set up before.

    Raises:
        ValueError: Already set up.
        TypeError: Not a ``torch.optim.Optimizer``.
    """
    if isinstance(optimizer, _FabricOptimizer) or optimizer in already_set_up:
        raise ValueError(
            f"fabric.setup(..., {type(unwrap(optimizer)).__name__}) got an optimizer that is already"
            " set up. Set up each optimizer once."
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"fabric.setup(model, *optimizers) and fabric.setup_optimizers(*optimizers) take optimizers,"
            f" but got {describe(optimizer)} (type {type(optimizer).__name__}). Pass torch.optim.Optimizer"
            " instances such as torch.optim.AdamW(model.parameters()); pass an LR scheduler as"
            " fabric.setup(..., scheduler=scheduler)."
        )


def require_set_up(obj: object, kind: type, method: str) -> None:
    """Raise ``TypeError`` unless ``obj`` is the wrapper ``fabric.setup`` returned for it."""
    if isinstance(obj, kind):
        return
    what = "model" if kind is _FabricModule else "optimizer"
    raise TypeError(
        f"fabric.{method}() needs the {what} returned by fabric.setup(), got {type(obj).__name__}."
        " Set it up first: model, optimizer = fabric.setup(model, optimizer)."
    )


def check_clip_arguments(clip_val: float | None, max_norm: float | None) -> None:
    """Exactly one of ``clip_val`` and ``max_norm`` must be given (``ValueError`` otherwise)."""
    if (clip_val is None) == (max_norm is None):
        raise ValueError(
            f"fabric.clip_gradients(clip_val={clip_val!r}, max_norm={max_norm!r}) needs exactly one of"
            " them. Pass clip_val=... to clip each value, or max_norm=... to clip the total norm."
        )


def check_launch_function(function: object) -> None:
    """``fabric.launch(fn)`` needs a callable that accepts the Fabric object first (``TypeError``)."""
    if not callable(function):
        raise TypeError(
            f"fabric.launch({function!r}) needs a function. Pass one that takes the Fabric object first:"
            " def train(fabric): ..."
        )
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return
    takes_varargs = any(p.kind == p.VAR_POSITIONAL for p in params.values())
    if not params or (not takes_varargs and all(p.kind == p.KEYWORD_ONLY for p in params.values())):
        name = getattr(function, "__name__", repr(function))
        raise TypeError(
            f"fabric.launch({name}) must accept the Fabric object as its first argument:"
            f" def {name}(fabric, ...): ..."
        )


def accepted_kwargs(method: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``method`` accepts (all of them if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def check_load_raw_target(target: object) -> None:
    """``fabric.load_raw`` loads into a module or anything with ``load_state_dict``.

    Raises:
        TypeError: ``target`` has no ``load_state_dict``.
    """
    if not callable(getattr(target, "load_state_dict", None)):
        raise TypeError(
            f"fabric.load_raw(path, obj) loads into a torch.nn.Module or an object with load_state_dict(),"
            f" got type {type(target).__name__}. Pass the model; for a dict of objects use"
            " fabric.load(path, state)."
        )


def check_raw_state(path: object, target: object, data: dict[str, Any]) -> None:
    """A file for ``fabric.load_raw`` must be a plain state_dict, not a dict of them (``fabric.save``'s).

    Raises:
        ValueError: ``data`` holds state dicts under names (or an older handloom's resume entry)
            where ``target`` expects its own entries.
    """
    from collections.abc import Mapping

    from handloom.checkpoint.resume import RESUME_KEY, is_legacy_entry

    if isinstance(target, torch.nn.Module):
        nested = any(isinstance(v, Mapping) for k, v in data.items() if not k.endswith("_extra_state"))
    elif isinstance(target, torch.optim.Optimizer):
        nested = not {"state", "param_groups"} <= data.keys() and any(
            isinstance(v, Mapping) for v in data.values()
        )
    else:
        nested = False
    if nested or is_legacy_entry(data.get(RESUME_KEY)):
        entries = sorted(k for k in data if not (k == RESUME_KEY and is_legacy_entry(data[k])))
        raise ValueError(
            f"fabric.load_raw({str(path)!r}, {type(target).__name__}) got a checkpoint written by"
            f" fabric.save (entries {entries}), not a plain state_dict. Load it with"
            " fabric.load(path, {'model': model}) instead."
        )
