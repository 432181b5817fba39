"""``lightning.fabric.plugins.environments.kubeflow``: re-exports of :mod:`handloom.environments.kubeflow`."""

from __future__ import annotations

from handloom.environments.base import ClusterEnvironment
from handloom.environments.kubeflow import KubeflowEnvironment

__all__ = ["ClusterEnvironment", "KubeflowEnvironment"]
