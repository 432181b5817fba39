"""``lightning.fabric.utilities.types``: the type aliases and protocols programs annotate with."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeAlias, TypeVar, overload, runtime_checkable

import torch
from torch import Tensor
from torch.distributed import ProcessGroup, ReduceOp
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

__all__ = [
    "CollectibleGroup",
    "Optimizable",
    "ProcessGroup",
    "RedOpType",
    "ReduceLROnPlateau",
    "ReduceOp",
    "Steppable",
    "UntypedStorage",
]

UntypedStorage: TypeAlias = torch.UntypedStorage
RedOpType: TypeAlias = ReduceOp.RedOpType

_PATH: TypeAlias = str | Path
_DEVICE: TypeAlias = torch.device | str | int
_MAP_LOCATION_TYPE: TypeAlias = (
    _DEVICE | Callable[[UntypedStorage, str], UntypedStorage | None] | dict[_DEVICE, _DEVICE] | None
)
_PARAMETERS: TypeAlias = Iterator[torch.nn.Parameter]
# Not in Lightning's fabric module (its Trainer package has them); offered for annotations.
_LRScheduler: TypeAlias = LRScheduler

_DictKey = TypeVar("_DictKey")


@runtime_checkable
class _Stateful(Protocol[_DictKey]):
    """Anything with ``state_dict()`` and ``load_state_dict()``: ``isinstance(obj, _Stateful)`` works."""

    def state_dict(self) -> dict[_DictKey, Any]: ...

    def load_state_dict(self, state_dict: dict[_DictKey, Any]) -> None: ...


@runtime_checkable
class CollectibleGroup(Protocol):
    """A process group as collectives see it: ``size()`` and ``rank()``."""

    def size(self) -> int: ...

    def rank(self) -> int: ...


@runtime_checkable
class Steppable(Protocol):
    """Anything with an optimizer's ``step(closure=None)``."""

    @overload
    def step(self, closure: None = ...) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = ...) -> float | None: ...


@runtime_checkable
class Optimizable(Steppable, Protocol):
    """An optimizer, structurally: ``step``, ``param_groups``, ``defaults``, ``state`` and its state dict."""

    param_groups: list[dict[Any, Any]]
    defaults: dict[Any, Any]
    state: defaultdict[Tensor, Any]

    def state_dict(self) -> dict[str, dict[Any, Any]]: ...

    def load_state_dict(self, state_dict: dict[str, dict[Any, Any]]) -> None: ...
