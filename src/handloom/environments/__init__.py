"""Where this process sits in the job: one parser per launcher, and the one reader of ``os.environ``.

Each cluster environment parses a plain mapping of environment variables into a
:class:`Topology`. :func:`read_topology` picks the environment that launched the process and
is the only place in handloom that reads ``os.environ`` for topology.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from handloom.environments.base import ClusterEnvironment, Topology
from handloom.environments.kubeflow import KubeflowEnvironment
from handloom.environments.local import LocalEnvironment
from handloom.environments.lsf import LSFEnvironment
from handloom.environments.mpi import MPIEnvironment, discover_main_address_with_mpi
from handloom.environments.slurm import SLURMEnvironment, expand_hostlist
from handloom.environments.torchelastic import TorchElasticEnvironment

__all__ = [
    "ClusterEnvironment",
    "KubeflowEnvironment",
    "LSFEnvironment",
    "LocalEnvironment",
    "MPIEnvironment",
    "SLURMEnvironment",
    "Topology",
    "TorchElasticEnvironment",
    "discover_main_address_with_mpi",
    "expand_hostlist",
    "read_topology",
    "select_environment",
]

# First match wins. torchrun comes first because it may run inside a Slurm, LSF or Kubernetes
# job, whose variables then describe the job, not the processes torchrun started.
_DETECTION_ORDER: tuple[type[ClusterEnvironment], ...] = (
    TorchElasticEnvironment,
    SLURMEnvironment,
    LSFEnvironment,
    MPIEnvironment,
    KubeflowEnvironment,
)


def select_environment(
    env: Mapping[str, str], explicit: ClusterEnvironment | None = None
) -> ClusterEnvironment:
    """Pick the environment that launched this process.

    Args:
        env: The environment variables.
        explicit: An environment the user passed; it is returned as is.

    Returns:
        ``explicit`` when given, else the first of torchelastic, SLURM, LSF, MPI and Kubeflow
        whose ``detect`` accepts ``env``, else :class:`LocalEnvironment`.

    Raises:
        TypeError: ``explicit`` is not a :class:`ClusterEnvironment`.
    """
    if explicit is not None:
        if not isinstance(explicit, ClusterEnvironment):
            raise TypeError(
                f"The cluster environment {explicit!r} is a {type(explicit).__name__}, not a "
                "ClusterEnvironment. handloom reads the topology through that interface. Pass an "
                "instance such as SLURMEnvironment(), or None to detect it."
            )
        return explicit
    for environment_type in _DETECTION_ORDER:
        if environment_type.detect(env):
            return environment_type()
    return LocalEnvironment()


def read_topology(
    env: Mapping[str, str] | None = None, explicit: ClusterEnvironment | None = None
) -> tuple[ClusterEnvironment, Topology]:
    """Select the launch environment and read this process's topology from it.

    Args:
        env: The environment variables; ``None`` reads ``os.environ``.
        explicit: An environment the user passed instead of detection.

    Returns:
        The environment and the topology it parsed.

    Raises:
        ValueError: The selected environment's variables are missing or malformed.
        TypeError: ``explicit`` is not a :class:`ClusterEnvironment`.
    """
    variables = os.environ if env is None else env
    environment = select_environment(variables, explicit)
    return environment, environment.topology(variables)
