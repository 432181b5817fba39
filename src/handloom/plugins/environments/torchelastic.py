"""``lightning.fabric.plugins.environments.torchelastic``, from :mod:`handloom.environments.torchelastic`."""

from __future__ import annotations

from handloom.environments.base import ClusterEnvironment
from handloom.environments.torchelastic import TorchElasticEnvironment

__all__ = ["ClusterEnvironment", "TorchElasticEnvironment"]
