"""``lightning.fabric.plugins.environments.mpi``: re-exports of :mod:`handloom.environments.mpi`."""

from __future__ import annotations

from handloom.environments.base import ClusterEnvironment
from handloom.environments.lightning import find_free_network_port
from handloom.environments.mpi import MPIEnvironment

__all__ = ["ClusterEnvironment", "MPIEnvironment", "find_free_network_port"]
