"""Processes started by Slurm's ``srun``, one task per process."""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Mapping

from typing_extensions import override

from handloom.environments._hostlist import expand_hostlist
from handloom.environments._parse import EnvReader, variables
from handloom.environments.base import ParsedEnvironment, Topology

__all__ = ["SLURMEnvironment", "expand_hostlist"]

_FIX = "Start the script with srun inside the allocation, and do not override the SLURM_* variables."
# Job names Slurm gives interactive shells (salloc, srun --pty bash): there the user, not srun,
# starts the training script, so it must launch its own processes.
_INTERACTIVE_JOB_NAMES = ("bash", "interactive")
# Set by the mpirun of Open MPI, MVAPICH and Hydra (MPICH, Intel MPI) but never by srun. mpirun inside an
# allocation inherits SLURM_* from the batch script or from its srun-started daemons, and those
# describe the daemons, not the ranks.
_MPIRUN_VARS = ("OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
_TASKS_PER_NODE_VARS = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")
_TASK_COUNT = re.compile(r"(\d+)(?:\(x(\d+)\))?")
_BASE_PORT = 15000

if sys.platform == "win32":
    _DEFAULT_REQUEUE_SIGNAL: signal.Signals | None = None
else:
    _DEFAULT_REQUEUE_SIGNAL = signal.SIGUSR1


class SLURMEnvironment(ParsedEnvironment):
    """A task started by ``srun``: Slurm created every process and numbered them.

    The main address is ``MASTER_ADDR`` when set, else the first host of the step's node list;
    the main port is ``MASTER_PORT`` when set, else 15000 plus the last four digits of the job
    id, so every task of a job agrees on it without talking.

    Args:
        auto_requeue: Whether to requeue the job when Slurm signals that it will be preempted.
        requeue_signal: The signal Slurm sends before preemption (``#SBATCH --signal``), or
            ``None`` to not listen for one. Defaults to ``SIGUSR1`` (``None`` on Windows).

    Raises:
        TypeError: ``requeue_signal`` is not a ``signal.Signals`` member or ``None``.
    """

    name = "slurm"

    def __init__(
        self, auto_requeue: bool = True, requeue_signal: signal.Signals | None = _DEFAULT_REQUEUE_SIGNAL
    ) -> None:
        if requeue_signal is not None and not isinstance(requeue_signal, signal.Signals):
            raise TypeError(
                f"SLURMEnvironment(requeue_signal={requeue_signal!r}) is not a signal. The requeue "
                "handler is installed for a member of signal.Signals. Pass one, such as "
                "signal.SIGUSR1, or None."
            )
        self.auto_requeue = bool(auto_requeue)
        self.requeue_signal = requeue_signal

    @staticmethod
    @override
    def detect(env: Mapping[str, str] | None = None) -> bool:
        """Return True when ``srun`` started this process.

        Args:
            env: The environment variables; ``None`` reads this process's (Lightning's ``detect()``).

        Returns:
            Whether ``SLURM_NTASKS`` is set, the job is not an interactive shell (job name
            ``bash`` or ``interactive``), and no ``mpirun`` started the process instead.
        """
        env = variables(env)
        return (
            "SLURM_NTASKS" in env
            and env.get("SLURM_JOB_NAME") not in _INTERACTIVE_JOB_NAMES
            and not any(name in env for name in _MPIRUN_VARS)
        )

    @override
    def topology(self, env: Mapping[str, str]) -> Topology:
        """Read the task's place from Slurm's variables.

        Args:
            env: The environment variables.

        Returns:
            The topology. ``local_world_size`` comes from the tasks-per-node variables (step,
            then job, then ``--ntasks-per-node``) and is ``None`` when none is set.

        Raises:
            ValueError: A required variable is missing or malformed, or a rank is not below its
                size; the message names the variable.
        """
        reader = EnvReader(env, launcher="srun", fix=_FIX)
        world_size = reader.integer("SLURM_NTASKS", minimum=1)
        global_rank = reader.integer("SLURM_PROCID")
        reader.check_below("SLURM_PROCID", global_rank, "SLURM_NTASKS", world_size)
        local_rank = reader.integer("SLURM_LOCALID")
        node_rank = reader.integer("SLURM_NODEID")
        hosts = _read_hosts(reader)
        num_nodes = reader.optional_integer("SLURM_NNODES", minimum=1)
        if num_nodes is None:
            num_nodes = len(hosts)
            reader.check_below("SLURM_NODEID", node_rank, "the number of hosts in the node list", num_nodes)
        else:
            reader.check_below("SLURM_NODEID", node_rank, "SLURM_NNODES", num_nodes)
        local_world_size, source = _tasks_on_node(reader, node_rank)
        if local_world_size is not None:
            reader.check_below("SLURM_LOCALID", local_rank, source, local_world_size)
        return Topology(
            name=self.name,
            world_size=world_size,
            global_rank=global_rank,
            local_rank=local_rank,
            node_rank=node_rank,
            local_world_size=local_world_size,
            num_nodes=num_nodes,
            main_address=reader.text("MASTER_ADDR") or hosts[0],
            main_port=reader.port() or _BASE_PORT + reader.integer("SLURM_JOB_ID") % 10_000,
            creates_processes_externally=True,
        )

    def requeue_id(self, env: Mapping[str, str]) -> str:
        """The id ``scontrol requeue`` takes for this job.

        Args:
            env: The environment variables.

        Returns:
            ``<SLURM_ARRAY_JOB_ID>_<SLURM_ARRAY_TASK_ID>`` for a task of an array job, else
            ``SLURM_JOB_ID``.

        Raises:
            ValueError: The variable is missing or not a whole number; the message names it.
        """
        reader = EnvReader(env, launcher="srun", fix=_FIX)
        if reader.text("SLURM_ARRAY_JOB_ID") and reader.text("SLURM_ARRAY_TASK_ID"):
            return f"{reader.integer('SLURM_ARRAY_JOB_ID')}_{reader.integer('SLURM_ARRAY_TASK_ID')}"
        return str(reader.integer("SLURM_JOB_ID"))

    @staticmethod
    def job_name() -> str | None:
        """The job's name, ``SLURM_JOB_NAME``, or ``None`` outside Slurm."""
        return os.environ.get("SLURM_JOB_NAME")

    @staticmethod
    def job_id() -> int | None:
        """The job id, ``SLURM_JOB_ID``: ``None`` outside Slurm, in an interactive shell or when malformed."""
        if SLURMEnvironment.job_name() in _INTERACTIVE_JOB_NAMES:
            return None  # so that a shell's runs do not share one job id (Lightning's rule)
        value = os.environ.get("SLURM_JOB_ID", "").strip()
        return int(value) if value.isascii() and value.isdigit() else None

    @staticmethod
    def resolve_root_node_address(nodes: str) -> str:
        """The first host of a Slurm node list, such as ``"node[04-07],gpu1"`` or ``"host0 host1"``.

        Args:
            nodes: The node list.

        Returns:
            Its first host name.

        Raises:
            ValueError: The node list is malformed or names no host.
        """
        hosts = expand_hostlist(nodes.replace(" ", ","))
        if not hosts:
            raise ValueError(
                f"SLURMEnvironment.resolve_root_node_address({nodes!r}) got no host name. It returns the"
                " first host of a Slurm node list. Pass one, such as 'node[01-04]'."
            )
        return hosts[0]

    @override
    def __repr__(self) -> str:
        return f"SLURMEnvironment(auto_requeue={self.auto_requeue}, requeue_signal={self.requeue_signal!r})"


def _read_hosts(reader: EnvReader) -> list[str]:
    name = "SLURM_NODELIST" if reader.text("SLURM_NODELIST") else "SLURM_JOB_NODELIST"
    value = reader.require_text(name)
    try:
        hosts = expand_hostlist(value)
    except ValueError as err:
        raise ValueError(f"{name}={err}") from None
    if not hosts:
        raise ValueError(f"{name}={value!r} names no host. handloom needs one for the main address. {_FIX}")
    return hosts


def _tasks_on_node(reader: EnvReader, node_rank: int) -> tuple[int | None, str]:
    """Read ``"2(x3),1"``-style task counts; return the count on ``node_rank`` and where it is from."""
    name = next((name for name in _TASKS_PER_NODE_VARS if reader.text(name)), None)
    if name is None:
        return None, ""
    value = reader.require_text(name)
    counts: list[int] = []
    for item in value.split(","):
        match = _TASK_COUNT.fullmatch(item.strip())
        if match is None:
            raise ValueError(
                f"{name}={value!r} is not a task count list. Slurm writes it as counts with "
                f"optional repeats, like '2(x3),1'. {_FIX}"
            )
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    if len(counts) == 1:
        return counts[0], name
    if node_rank < len(counts):
        return counts[node_rank], f"{name}[node {node_rank}]"
    return None, ""
