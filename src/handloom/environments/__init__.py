"""Where this process sits in the job: one parser per launcher, and the one reader of ``os.environ``.

Each cluster environment parses a plain mapping of environment variables into a
:class:`Topology`. :func:`read_topology` picks the environment that launched the process and
is the only place in handloom that reads ``os.environ`` for topology (the Lightning methods of
the environments, such as ``world_size()``, read it for programs that call them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace

from handloom.environments.base import ClusterEnvironment, ParsedEnvironment, Topology, check_world_size
from handloom.environments.kubeflow import KubeflowEnvironment
from handloom.environments.lightning import LightningEnvironment
from handloom.environments.local import LocalEnvironment
from handloom.environments.lsf import LSFEnvironment
from handloom.environments.mpi import MPIEnvironment, discover_main_address_with_mpi
from handloom.environments.slurm import SLURMEnvironment, expand_hostlist
from handloom.environments.torchelastic import TorchElasticEnvironment
from handloom.environments.xla import XLAEnvironment

__all__ = [
    "ClusterEnvironment",
    "KubeflowEnvironment",
    "LSFEnvironment",
    "LightningEnvironment",
    "LocalEnvironment",
    "MPIEnvironment",
    "SLURMEnvironment",
    "Topology",
    "TorchElasticEnvironment",
    "XLAEnvironment",
    "discover_main_address_with_mpi",
    "expand_hostlist",
    "join_job",
    "read_topology",
    "record_ranks",
    "select_environment",
]

# First match wins. torchrun comes first because it may run inside a Slurm, LSF or Kubernetes
# job, whose variables then describe the job, not the processes torchrun started.
_DETECTION_ORDER: tuple[type[ParsedEnvironment], ...] = (
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
        whose ``detect`` accepts ``env``; else, as in Lightning, :class:`LightningEnvironment` when
        ``LOCAL_RANK`` is set (every process was started by hand or by another tool) and
        :class:`LocalEnvironment` (handloom starts the processes) when it is not.

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
    if "LOCAL_RANK" in env:
        return LightningEnvironment()
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
    if _follows_agent(environment) and TorchElasticEnvironment.detect(variables):
        # A torchelastic agent (handloom's own launcher, or torchrun) started this process, and the
        # environment does not read launchers' variables: the agent's say where the process sits
        # and how it joins the group. Without this, a worker would launch workers of its own.
        return environment, TorchElasticEnvironment().topology(variables)
    topology = environment.topology(variables)
    if isinstance(environment, ParsedEnvironment):
        topology = environment.with_overrides(topology)
    return environment, topology


def _follows_agent(environment: ClusterEnvironment) -> bool:
    """True for the default environments and those written for Lightning (no parser of their own)."""
    return isinstance(environment, LocalEnvironment) or not isinstance(environment, ParsedEnvironment)


def record_ranks(environment: ClusterEnvironment, topology: Topology) -> None:
    """Tell ``environment`` the job's size and this process's rank, as Lightning's strategies do.

    Environments whose launcher fixed the ranks ignore it; the default ones and those written for
    Lightning then report them from ``world_size()`` and ``global_rank()``.

    Args:
        environment: The job's environment.
        topology: This process's place in the job.
    """
    environment.set_world_size(topology.world_size)
    environment.set_global_rank(topology.global_rank)


def join_job(
    environment: ClusterEnvironment,
    topology: Topology,
    env: Mapping[str, str],
    num_processes: int,
    num_nodes: int,
    devices: object,
) -> Topology:
    """Fit a process that a launcher started into the job Fabric was asked for.

    As Lightning's strategies do, the environment is told the world size
    (``num_processes * num_nodes``) and this process's rank (``node_rank * num_processes +
    local_rank``), and then read again; an environment written for Lightning first checks the
    counts with its own ``validate_settings``.

    Args:
        environment: The job's environment.
        topology: What it said before.
        env: The environment variables.
        num_processes: Processes per node Fabric resolved.
        num_nodes: Nodes Fabric was given.
        devices: The ``devices`` value as the user wrote it, for messages.

    Returns:
        The topology the environment reports now.

    Raises:
        ValueError: ``num_processes * num_nodes`` is not the number of processes the launcher
            started, or the environment's ``validate_settings`` refused the counts.
    """
    if not isinstance(environment, ParsedEnvironment):
        environment.validate_settings(num_devices=num_processes, num_nodes=num_nodes)
    rank = topology.node_rank * num_processes + topology.local_rank
    record_ranks(environment, replace(topology, world_size=num_processes * num_nodes, global_rank=rank))
    _, topology = read_topology(env, environment)
    check_world_size(topology, num_processes, num_nodes, devices)
    return topology
