"""``lightning.fabric.plugins.environments.lsf``: re-exports of :mod:`handloom.environments.lsf`."""

from __future__ import annotations

from handloom.environments.base import ClusterEnvironment
from handloom.environments.lsf import LSFEnvironment

__all__ = ["ClusterEnvironment", "LSFEnvironment"]
