"""The contract every cluster environment fulfils: parse a mapping of environment variables."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Topology:
    """Where this process sits in the job, as read from the launch environment.

    Attributes:
        name: The environment that produced it (``"local"``, ``"torchelastic"``, ``"slurm"``, ...).
        world_size: Total number of processes in the job.
        global_rank: This process's rank among all of them.
        local_rank: This process's rank on its node.
        node_rank: The index of this node.
        local_world_size: Processes on this node, or ``None`` when the environment does not say.
        num_nodes: Nodes in the job, or ``None`` when the environment does not say.
        main_address: Address of the rendezvous host, or ``None`` when it must be discovered.
        main_port: Port of the rendezvous host, or ``None`` when a free one is to be picked.
        creates_processes_externally: True when a launcher (torchrun, srun, mpirun, ...) already
            started every process; False when handloom must start them.
        restart_count: How often a torchelastic agent has restarted the workers (0 elsewhere).
        agent_store: True when the torchelastic agent hosts the job's TCPStore at the main address.
    """

    name: str
    world_size: int
    global_rank: int
    local_rank: int
    node_rank: int
    local_world_size: int | None
    num_nodes: int | None
    main_address: str | None
    main_port: int | None
    creates_processes_externally: bool
    restart_count: int = 0
    agent_store: bool = False


class ClusterEnvironment(ABC):
    """Reads a job's topology from environment variables.

    Subclasses parse a plain mapping so they can be tested with dicts; nothing here reads
    ``os.environ`` directly (that happens once, in :func:`handloom.environments.read_topology`).
    """

    name: str = "abstract"

    @staticmethod
    @abstractmethod
    def detect(env: Mapping[str, str]) -> bool:
        """Return True when ``env`` shows this kind of cluster launched the process."""

    @abstractmethod
    def topology(self, env: Mapping[str, str]) -> Topology:
        """Parse ``env`` into a :class:`Topology`.

        Raises:
            ValueError: A variable is missing or malformed; the message names it.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
