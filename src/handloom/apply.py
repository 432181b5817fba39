"""Apply a function to the elements of nested Python collections (tensors, mostly).

:func:`apply_to_collection` is the one walker; the other functions here, and
``handloom.utilities.apply_func``, are built on it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys
from abc import ABC
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import torch

# Sequences that are values, not containers: their items are never visited.
_ATOMIC_SEQUENCES = (str, bytes, bytearray, memoryview, range)
# Non-blocking copies are only asynchronous (and only safe) towards these device types' peers.
_BLOCKING_DEVICE_TYPES = ("cpu", "mps")


def apply_to_collection(
    data: Any,
    dtype: type | tuple[type, ...],
    function: Callable[..., Any],
    *args: Any,
    wrong_dtype: type | tuple[type, ...] | None = None,
    include_none: bool = True,
    allow_frozen: bool = False,
    **kwargs: Any,
) -> Any:
    """Return ``data`` with ``function(element, *args, **kwargs)`` applied to every ``dtype`` element.

    Containers are rebuilt with their own type: mappings (a ``dict`` subclass or ``defaultdict``
    keeps its type and attributes), named tuples, lists, tuples and other sequences, and dataclass
    instances (a copy with the changed fields; fields with ``init=False`` keep their value). An
    element that is itself an instance of ``dtype`` is passed to ``function`` whole, even if it is
    a container. Anything else is returned as it is.

    Args:
        data: The collection (or a single element).
        dtype: The type or types of the elements to transform.
        function: Called on each such element; its result takes the element's place.
        *args: More positional arguments for ``function``.
        wrong_dtype: Elements of this type are not transformed even if they are ``dtype``s.
        include_none: Keep entries for which ``function`` returned ``None``; ``False`` drops them
            from mappings and sequences (a dataclass field keeps its old value).
        allow_frozen: Accepted for compatibility with Lightning. Frozen dataclasses are always
            handled: a copy with the changed fields is returned, the original is never modified.
        **kwargs: More keyword arguments for ``function``.

    Returns:
        The transformed collection.
    """
    del allow_frozen  # frozen dataclasses are copied, never refused (see the docstring)
    if args or kwargs:
        function = functools.partial(function, *args, **kwargs)
    return _walk(data, dtype, function, wrong_dtype, include_none)


def _walk(
    data: Any,
    dtype: type | tuple[type, ...],
    fn: Callable[[Any], Any],
    wrong: type | tuple[type, ...] | None,
    keep_none: bool,
) -> Any:
    if isinstance(data, dtype) and (wrong is None or not isinstance(data, wrong)):
        return fn(data)

    def walk(value: Any) -> Any:
        return _walk(value, dtype, fn, wrong, keep_none)

    container: Any = type(data)  # rebuilt with the caller's own container type
    if isinstance(data, Mapping):
        pairs = [(key, walk(value)) for key, value in data.items()]
        kept = [(key, value) for key, value in pairs if keep_none or value is not None]
        if type(data) is dict:
            return dict(kept)
        if isinstance(data, MutableMapping):
            # A copy keeps the subclass, its attributes and a defaultdict's factory.
            out = copy.copy(data)
            for key, value in pairs:
                if keep_none or value is not None:
                    out[key] = value
                else:
                    del out[key]
            return out
        return container(dict(kept))
    if isinstance(data, tuple) and hasattr(data, "_fields") and hasattr(data, "_asdict"):
        return container(*(item for item in map(walk, data) if keep_none or item is not None))
    if isinstance(data, Sequence) and not isinstance(data, _ATOMIC_SEQUENCES):
        items = [item for item in map(walk, data) if keep_none or item is not None]
        return items if container is list else container(items)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return _walk_dataclass(data, walk, keep_none)
    return data


def _walk_dataclass(data: Any, walk: Callable[[Any], Any], keep_none: bool) -> Any:
    result = copy.copy(data)
    for field in dataclasses.fields(data):
        if not field.init:
            continue  # derived in __init__/__post_init__: keep the value it has
        value = walk(getattr(data, field.name))
        if value is None and not keep_none:
            continue
        # object.__setattr__ also works on the copy of a frozen dataclass; the original is untouched.
        object.__setattr__(result, field.name, value)
    # Cached properties were computed from the old field values.
    for name, attribute in vars(type(data)).items():
        if isinstance(attribute, functools.cached_property) and hasattr(result, "__dict__"):
            vars(result).pop(name, None)
    return result


def apply_to_tensors(data: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Return ``data`` with ``fn`` applied to every tensor, keeping container types.

    See :func:`apply_to_collection` for the containers handled.
    """
    return apply_to_collection(data, torch.Tensor, fn)


def convert_to_tensors(data: Any, device: torch.device | str | int) -> Any:
    """Turn every Python number and NumPy array inside ``data`` into a tensor on ``device``.

    The dtypes are Lightning's: ``bool`` becomes ``uint8`` (NCCL has no bool), ``int`` becomes
    ``int32`` and ``float`` becomes ``float32``; an array keeps its dtype (and, on the CPU, shares
    its memory). Tensors and anything else are left as they are.
    """
    numpy = sys.modules.get("numpy")  # an array can only exist if NumPy was imported
    kinds: tuple[type, ...] = (bool, int, float) if numpy is None else (bool, int, float, numpy.ndarray)

    def convert(value: Any) -> torch.Tensor:
        if isinstance(value, bool):
            return torch.tensor(value, dtype=torch.uint8, device=device)
        if isinstance(value, int):
            return torch.tensor(value, dtype=torch.int32, device=device)
        if isinstance(value, float):
            return torch.tensor(value, dtype=torch.float32, device=device)
        return torch.from_numpy(value).to(device)

    return apply_to_collection(data, kinds, convert)


class _Transferable(ABC):  # noqa: B024 (no abstract methods: the subclass hook decides membership)
    """Anything with a callable ``to`` attribute: tensors, modules, batch classes with ``.to(device)``."""

    @classmethod
    def __subclasshook__(cls, subclass: type) -> Any:  # bool, or NotImplemented for subclasses
        if cls is _Transferable:
            return bool(callable(getattr(subclass, "to", None)))
        return NotImplemented


def move_data_to_device(batch: Any, device: torch.device | str | int) -> Any:
    """Move every object with a ``.to(device)`` method in ``data`` to ``device``.

    Tensors are copied non-blocking, except towards the CPU or MPS. Other objects with ``.to``
    (batch classes, Hugging Face ``BatchEncoding``) are moved with it, at any depth; if their
    ``.to`` works in place and returns ``None``, the object itself is kept.

    Args:
        batch: A tensor, an object with ``.to``, or a collection of them (see
            :func:`apply_to_collection`).
        device: The target device.

    Returns:
        ``batch`` with everything moved.
    """
    if isinstance(device, str):
        device = torch.device(device)
    non_blocking = isinstance(device, torch.device) and device.type not in _BLOCKING_DEVICE_TYPES

    def move(obj: Any) -> Any:
        if non_blocking and isinstance(obj, torch.Tensor):
            return obj.to(device, non_blocking=True)
        moved = obj.to(device)
        return obj if moved is None else moved

    return apply_to_collection(batch, _Transferable, move)
