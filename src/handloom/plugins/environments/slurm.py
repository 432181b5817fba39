"""``lightning.fabric.plugins.environments.slurm``: re-exports of :mod:`handloom.environments.slurm`."""

from __future__ import annotations

from handloom.environments.base import ClusterEnvironment
from handloom.environments.slurm import SLURMEnvironment

__all__ = ["ClusterEnvironment", "SLURMEnvironment"]
