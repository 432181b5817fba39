"""``lightning.fabric.plugins.environments.lightning``: re-exports :mod:`handloom.environments.lightning`."""

from __future__ import annotations

from handloom.environments.base import ClusterEnvironment
from handloom.environments.lightning import LightningEnvironment, find_free_network_port

__all__ = ["ClusterEnvironment", "LightningEnvironment", "find_free_network_port"]
