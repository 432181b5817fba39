"""Processes started by ``mpirun``/``mpiexec`` (Open MPI, MVAPICH, MPICH, Intel MPI)."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass

from typing_extensions import override

from handloom.environments._parse import EnvReader, variables
from handloom.environments.base import ParsedEnvironment, Topology

_FIX = "Start the script with mpirun or mpiexec, and do not override the variables it sets."


@dataclass(frozen=True, slots=True)
class _Launcher:
    """The variables one MPI implementation's launcher sets for each rank."""

    name: str
    size: str
    rank: str
    local_rank: str
    local_size: str


_LAUNCHERS = (
    _Launcher(
        "Open MPI mpirun",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    _Launcher(
        "MVAPICH mpirun",
        "MV2_COMM_WORLD_SIZE",
        "MV2_COMM_WORLD_RANK",
        "MV2_COMM_WORLD_LOCAL_RANK",
        "MV2_COMM_WORLD_LOCAL_SIZE",
    ),
    # Hydra, the process manager of MPICH and Intel MPI. srun --mpi=pmi2 sets PMI_SIZE too, but
    # not the MPI_LOCAL* pair, so requiring that pair leaves srun's tasks to SLURMEnvironment.
    _Launcher("MPICH/Intel MPI mpiexec", "PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


def _find_launcher(env: Mapping[str, str]) -> _Launcher | None:
    return next((la for la in _LAUNCHERS if la.size in env and la.local_size in env), None)


class MPIEnvironment(ParsedEnvironment):
    """A rank started by an MPI launcher, read from the launcher's variables alone.

    Nothing here imports ``mpi4py``. The node rank is ``rank // ranks_per_node``, which holds
    when every node runs the same number of ranks and consecutive ranks share a node (the
    default placement of Open MPI, MPICH and Intel MPI); other layouts are rejected. The main
    address and port are ``MASTER_ADDR`` and ``MASTER_PORT`` when set, else ``None``: then the
    process-group setup calls :func:`discover_main_address_with_mpi`.
    """

    name = "mpi"

    def __init__(self) -> None:
        self._discovered: tuple[str, int] | None = None

    @property
    @override
    def main_address(self) -> str:
        """``MASTER_ADDR``, or else rank 0's host name, shared over MPI (every rank must ask)."""
        address = self.current().main_address
        return address if address is not None else self._discover()[0]

    @property
    @override
    def main_port(self) -> int:
        """``MASTER_PORT``, or else a port free on rank 0, shared over MPI (every rank must ask)."""
        port = self.current().main_port
        return port if port is not None else self._discover()[1]

    def _discover(self) -> tuple[str, int]:
        if self._discovered is None:
            self._discovered = discover_main_address_with_mpi()
        return self._discovered

    @staticmethod
    @override
    def detect(env: Mapping[str, str] | None = None) -> bool:
        """Return True when an MPI launcher started more than one rank.

        Args:
            env: The environment variables; ``None`` reads this process's (Lightning's ``detect()``).

        Returns:
            Whether a launcher's world-size and local-size variables are set
            (``OMPI_COMM_WORLD_*``, ``MV2_COMM_WORLD_*``, or ``PMI_SIZE`` with
            ``MPI_LOCALNRANKS``) and the world size is above 1. A malformed size counts as
            detected, so that :meth:`topology` reports it.
        """
        env = variables(env)
        launcher = _find_launcher(env)
        if launcher is None:
            return False
        size = env[launcher.size].strip()
        return not size.isdigit() or int(size) > 1

    @override
    def topology(self, env: Mapping[str, str]) -> Topology:
        """Read the rank's place from the MPI launcher's variables.

        Args:
            env: The environment variables.

        Returns:
            The topology.

        Raises:
            ValueError: No MPI launcher's variables are set, one is malformed, a rank is not
                below its size, or the ranks are not spread evenly and in blocks over the nodes.
        """
        launcher = _find_launcher(env) or _LAUNCHERS[0]
        reader = EnvReader(env, launcher=launcher.name, fix=_FIX)
        world_size = reader.integer(launcher.size, minimum=1)
        global_rank = reader.integer(launcher.rank)
        reader.check_below(launcher.rank, global_rank, launcher.size, world_size)
        local_size = reader.integer(launcher.local_size, minimum=1)
        local_rank = reader.integer(launcher.local_rank)
        reader.check_below(launcher.local_rank, local_rank, launcher.local_size, local_size)
        if world_size % local_size:
            raise ValueError(
                f"{launcher.size}={world_size} is not a multiple of {launcher.local_size}={local_size}. "
                "handloom numbers the nodes as rank // ranks per node, which needs the same number "
                "of ranks on every node. Start as many ranks on each node (mpirun -npernode N)."
            )
        if local_rank != global_rank % local_size:
            raise ValueError(
                f"{launcher.local_rank}={local_rank} does not fit {launcher.rank}={global_rank} with "
                f"{local_size} ranks per node. handloom numbers the nodes as rank // ranks per node, "
                "which needs consecutive ranks on each node. Place ranks by slot or core (mpirun "
                "--map-by slot), not round-robin over nodes."
            )
        return Topology(
            name=self.name,
            world_size=world_size,
            global_rank=global_rank,
            local_rank=local_rank,
            node_rank=global_rank // local_size,
            local_world_size=local_size,
            num_nodes=world_size // local_size,
            main_address=reader.text("MASTER_ADDR"),
            main_port=reader.port(),
            creates_processes_externally=True,
        )


def discover_main_address_with_mpi() -> tuple[str, int]:
    """Agree on a rendezvous address over MPI: rank 0's host name and a port free there.

    Every rank must call it (it is a broadcast).

    Returns:
        The main address and port, the same on every rank.

    Raises:
        ImportError: ``mpi4py`` is not installed.
    """
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise ImportError(
            "mpi4py is not installed. handloom needs it to share the main address over MPI when "
            "MASTER_ADDR and MASTER_PORT are not set. Install it with `pip install mpi4py`, or set "
            "both variables before mpirun."
        ) from err
    payload = None
    if MPI.COMM_WORLD.Get_rank() == 0:
        with socket.socket() as sock:
            sock.bind(("", 0))
            payload = (socket.gethostname(), sock.getsockname()[1])
    address, port = MPI.COMM_WORLD.bcast(payload, root=0)
    return str(address), int(port)
