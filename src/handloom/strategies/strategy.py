"""Lightning's ``lightning.fabric.strategies.strategy`` module path: the :class:`Strategy` base class."""

from __future__ import annotations

from typing import TypeVar

from handloom.strategies.base import Strategy

TBroadcast = TypeVar("TBroadcast")
TReduce = TypeVar("TReduce")

__all__ = ["Strategy", "TBroadcast", "TReduce"]
