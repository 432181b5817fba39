"""``lightning.fabric.plugins.environments.xla``: re-exports of :mod:`handloom.environments.xla`."""

from __future__ import annotations

from handloom.environments.base import ClusterEnvironment
from handloom.environments.xla import XLAEnvironment

__all__ = ["ClusterEnvironment", "XLAEnvironment"]
