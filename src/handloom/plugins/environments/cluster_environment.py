"""``lightning.fabric.plugins.environments.cluster_environment``, from :mod:`handloom.environments.base`."""

from __future__ import annotations

from handloom.environments.base import ClusterEnvironment

__all__ = ["ClusterEnvironment"]
