"""Cluster environments, as ``lightning.fabric.plugins.environments``: where each process sits in a job.

Each name re-exports the one implementation in :mod:`handloom.environments`. Pass an instance in
``Fabric(plugins=[...])`` to use it instead of detection, or subclass :class:`ClusterEnvironment`
(implementing Lightning's abstract methods) for a cluster handloom does not know.
"""

from __future__ import annotations

from handloom.environments import (
    ClusterEnvironment,
    KubeflowEnvironment,
    LightningEnvironment,
    LSFEnvironment,
    MPIEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
    XLAEnvironment,
)

__all__ = [
    "ClusterEnvironment",
    "KubeflowEnvironment",
    "LSFEnvironment",
    "LightningEnvironment",
    "MPIEnvironment",
    "SLURMEnvironment",
    "TorchElasticEnvironment",
    "XLAEnvironment",
]
