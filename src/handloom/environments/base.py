"""The contract every cluster environment fulfils: Lightning's interface, read as one :class:`Topology`."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

from typing_extensions import override

from handloom.environments._parse import MAX_PORT

_T = TypeVar("_T")


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
    """Where this process sits in a job, with the interface of Lightning's ``ClusterEnvironment``.

    handloom reads an environment once per process through :meth:`topology`, which returns a frozen
    :class:`Topology`. An environment written for Lightning implements only the abstract methods
    below; its topology is then built from them, and handloom calls :meth:`set_world_size` and
    :meth:`set_global_rank` as Lightning's strategies do. handloom's own environments parse a
    mapping of variables in :meth:`topology` instead (tests pass dicts), and their Lightning
    methods read this process's variables through it.

    Example::

        class MyClusterEnvironment(ClusterEnvironment):
            @property
            def creates_processes_externally(self) -> bool:
                return True  # the scheduler started every process

            def global_rank(self) -> int:
                return int(os.environ["MY_RANK"])

            ...  # main_address, main_port, detect, world_size, local_rank, node_rank, the setters

        fabric = Fabric(devices=8, num_nodes=4, plugins=[MyClusterEnvironment()])
    """

    name: str = "abstract"

    @property
    @abstractmethod
    def creates_processes_externally(self) -> bool:
        """Whether a launcher outside Fabric (srun, torchrun, mpirun, ...) started every process."""

    @property
    @abstractmethod
    def main_address(self) -> str:
        """The address of the host where all processes meet."""

    @property
    @abstractmethod
    def main_port(self) -> int:
        """The port on the main address where all processes meet."""

    @staticmethod
    @abstractmethod
    def detect() -> bool:
        """Return True when this kind of cluster launched the current process."""

    @abstractmethod
    def world_size(self) -> int:
        """The number of processes in the job, over all nodes."""

    @abstractmethod
    def set_world_size(self, size: int) -> None:
        """Record the job's process count (environments whose launcher fixed it ignore this)."""

    @abstractmethod
    def global_rank(self) -> int:
        """This process's rank among all processes of the job."""

    @abstractmethod
    def set_global_rank(self, rank: int) -> None:
        """Record this process's global rank (environments whose launcher fixed it ignore this)."""

    @abstractmethod
    def local_rank(self) -> int:
        """This process's rank among the processes on its node."""

    @abstractmethod
    def node_rank(self) -> int:
        """The index of the node this process runs on."""

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:  # noqa: B027  (optional, as in Lightning)
        """Check Fabric's ``devices`` and ``num_nodes`` against the environment (does nothing here).

        Args:
            num_devices: Processes per node that Fabric was asked for.
            num_nodes: Nodes that Fabric was asked for.

        Raises:
            ValueError: In subclasses, when the two disagree with the environment.
        """

    def teardown(self) -> None:  # noqa: B027  (an optional hook, as in Lightning)
        """Undo what the environment changed in this process (nothing here)."""

    def topology(self, env: Mapping[str, str]) -> Topology:
        """Where this process sits, built from the Lightning methods (``env`` is not read).

        handloom's own environments override this to parse ``env``.

        Args:
            env: The environment variables.

        Returns:
            The topology the methods describe. ``main_address`` and ``main_port`` are ``None``
            where the property raises ``NotImplementedError`` or ``KeyError`` (a variable unset).

        Raises:
            ValueError: A method returned a value that cannot describe a process; the message
                names the method and the value.
            TypeError: A method returned something other than the type it must return.
        """
        owner = type(self).__name__
        world_size = _checked_int(owner, "world_size()", self.world_size(), minimum=1)
        global_rank = _checked_int(owner, "global_rank()", self.global_rank(), minimum=0)
        if global_rank >= world_size:
            raise ValueError(
                f"{owner}.global_rank() returned {global_rank}, which is not below its world_size() of"
                f" {world_size}. Ranks count from 0, so handloom cannot place this process. Make"
                " global_rank() return a value from 0 to world_size() - 1."
            )
        return Topology(
            name=owner,
            world_size=world_size,
            global_rank=global_rank,
            local_rank=_checked_int(owner, "local_rank()", self.local_rank(), minimum=0),
            node_rank=_checked_int(owner, "node_rank()", self.node_rank(), minimum=0),
            local_world_size=None,
            num_nodes=None,
            main_address=_optional(lambda: str(self.main_address)),
            main_port=_optional(lambda: _checked_port(owner, self.main_port)),
            creates_processes_externally=bool(self.creates_processes_externally),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ParsedEnvironment(ClusterEnvironment):
    """A handloom environment: :meth:`topology` parses variables; the Lightning methods read this process's.

    The launcher fixed the ranks, so :meth:`set_world_size` and :meth:`set_global_rank` change
    nothing, as in Lightning's environments for launched jobs.
    """

    @staticmethod
    @abstractmethod
    @override
    def detect(env: Mapping[str, str] | None = None) -> bool:
        """Return True when ``env`` (``None``: this process's variables) shows this cluster launched it."""

    @abstractmethod
    @override
    def topology(self, env: Mapping[str, str]) -> Topology:
        """Parse ``env`` into a :class:`Topology`.

        Raises:
            ValueError: A variable is missing or malformed; the message names it.
        """

    def current(self) -> Topology:
        """This process's topology, parsed from ``os.environ``."""
        return self.topology(os.environ)

    def with_overrides(self, topology: Topology) -> Topology:
        """``topology`` with the values of Lightning methods a user's subclass overrides.

        A program written for Lightning may subclass, say, ``SLURMEnvironment`` and override
        ``main_address``; what the override returns wins over the parsed variable, as in Lightning.
        """
        builtin: type[ParsedEnvironment] = next(
            c for c in type(self).__mro__ if c.__module__.startswith("handloom.")
        )
        if builtin is type(self):
            return topology
        owner = type(self).__name__
        changes: dict[str, object] = {}
        for name in ("world_size", "global_rank", "local_rank", "node_rank"):
            if getattr(type(self), name) is not getattr(builtin, name):
                changes[name] = _checked_int(owner, f"{name}()", getattr(self, name)(), minimum=0)
        if type(self).main_address is not builtin.main_address:
            changes["main_address"] = str(self.main_address)
        if type(self).main_port is not builtin.main_port:
            changes["main_port"] = _checked_port(owner, self.main_port)
        if type(self).creates_processes_externally is not builtin.creates_processes_externally:
            changes["creates_processes_externally"] = bool(self.creates_processes_externally)
        return replace(topology, **changes)  # type: ignore[arg-type]

    @property
    @override
    def creates_processes_externally(self) -> bool:
        return self.current().creates_processes_externally

    @property
    @override
    def main_address(self) -> str:
        address = self.current().main_address
        if address is None:
            raise RuntimeError(
                f"{type(self).__name__}().main_address is not known: MASTER_ADDR is not set and the"
                " launcher's variables do not name a main host. Set MASTER_ADDR to the host where"
                " the processes should meet."
            )
        return address

    @property
    @override
    def main_port(self) -> int:
        port = self.current().main_port
        if port is None:
            raise RuntimeError(
                f"{type(self).__name__}().main_port is not known: MASTER_PORT is not set and the"
                " launcher's variables do not give one. Set MASTER_PORT to a free port."
            )
        return port

    @override
    def world_size(self) -> int:
        return self.current().world_size

    @override
    def set_world_size(self, size: int) -> None:
        """Ignored: the launcher fixed the world size."""

    @override
    def global_rank(self) -> int:
        return self.current().global_rank

    @override
    def set_global_rank(self, rank: int) -> None:
        """Ignored: the launcher fixed the ranks."""

    @override
    def local_rank(self) -> int:
        return self.current().local_rank

    @override
    def node_rank(self) -> int:
        return self.current().node_rank

    @override
    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        """Check that ``num_devices * num_nodes`` is the number of processes the launcher started.

        Raises:
            ValueError: They differ; the message gives both counts.
        """
        check_world_size(self.current(), num_devices, num_nodes, devices=num_devices)


def check_world_size(topology: Topology, num_processes: int, num_nodes: int, devices: object) -> None:
    """Raise ``ValueError`` unless ``num_processes * num_nodes`` processes is what the launcher started.

    Args:
        topology: What the launcher says.
        num_processes: Processes per node Fabric resolved.
        num_nodes: Nodes Fabric was given.
        devices: The ``devices`` value as the user wrote it, for the message.
    """
    if num_processes * num_nodes == topology.world_size:
        return
    raise ValueError(
        f"Fabric(devices={devices!r}, num_nodes={num_nodes}) asks for {num_processes * num_nodes} processes,"
        f" but the {topology.name} launcher started {topology.world_size}."
        f" Make devices x num_nodes equal the launcher's process count ({topology.world_size}),"
        " or leave devices='auto'."
    )


def _checked_int(owner: str, method: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{owner}.{method} returned {value!r} of type {type(value).__name__}, not an int."
            f" handloom places the process by it. Make {method} return an int."
        )
    if value < minimum:
        raise ValueError(
            f"{owner}.{method} returned {value}, below {minimum}. handloom places the process by it."
            f" Make {method} return at least {minimum}."
        )
    return value


def _checked_port(owner: str, value: object) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PORT:
        raise ValueError(
            f"{owner}.main_port returned {value!r}, which is not a port number. Ports are whole"
            f" numbers from 1 to {MAX_PORT}. Make main_port return the port the processes meet at."
        )
    return value


def _optional(read: Callable[[], _T]) -> _T | None:
    """``read()``, or ``None`` when the environment does not implement it or lacks a variable for it.

    Lightning reads the main address and port only to join several processes; a one-process
    job may leave them unset, and a job that needs them is told so when it joins.
    """
    try:
        return read()
    except (NotImplementedError, KeyError):
        return None
