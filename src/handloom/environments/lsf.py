"""Processes started by IBM LSF's ``jsrun`` (Summit-style clusters)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from pathlib import Path

from typing_extensions import override

from handloom.environments._parse import EnvReader, variables
from handloom.environments.base import ParsedEnvironment, Topology

_FIX = "Start the script with jsrun inside the LSF job, and do not override the variables it sets."
_DETECT_VARS = ("LSB_JOBID", "LSB_DJOB_RANKFILE", "JSM_NAMESPACE_LOCAL_RANK", "JSM_NAMESPACE_SIZE")
_BASE_PORT = 10000


def _read_file(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


class LSFEnvironment(ParsedEnvironment):
    """A process started by ``jsrun``: LSF created every process and numbered them.

    The hosts come from the rank file named by ``LSB_DJOB_RANKFILE``: one line per slot, the
    first line being the launch (batch) host, which runs no training process and is skipped.
    The node rank is the position of this host among the distinct compute hosts; the main
    address is ``MASTER_ADDR`` when set, else the first compute host; the main port is
    ``MASTER_PORT`` when set, else 10000 plus the job id modulo 1000.

    Args:
        hostname: This host's name as the rank file spells it; defaults to
            ``socket.gethostname()``, read when the topology is.
        read_text: Returns a file's text given its path; replace it to read the rank file from
            elsewhere (tests pass a dict lookup).
    """

    name = "lsf"

    def __init__(self, hostname: str | None = None, read_text: Callable[[str], str] = _read_file) -> None:
        self.hostname = hostname
        self.read_text = read_text

    @staticmethod
    @override
    def detect(env: Mapping[str, str] | None = None) -> bool:
        """Return True when ``jsrun`` started this process in an LSF job.

        Args:
            env: The environment variables; ``None`` reads this process's (Lightning's ``detect()``).

        Returns:
            Whether all of ``LSB_JOBID``, ``LSB_DJOB_RANKFILE``, ``JSM_NAMESPACE_LOCAL_RANK`` and
            ``JSM_NAMESPACE_SIZE`` are set.
        """
        env = variables(env)
        return all(name in env for name in _DETECT_VARS)

    @override
    def topology(self, env: Mapping[str, str]) -> Topology:
        """Read the process's place from jsrun's variables and the job's rank file.

        Args:
            env: The environment variables.

        Returns:
            The topology; ``local_world_size`` is ``JSM_NAMESPACE_LOCAL_SIZE`` or ``None``.

        Raises:
            ValueError: A variable is missing or malformed, a rank is not below its size, the
                rank file cannot be read or lists no compute host, or this host is not in it.
        """
        reader = EnvReader(env, launcher="jsrun", fix=_FIX)
        world_size = reader.integer("JSM_NAMESPACE_SIZE", minimum=1)
        global_rank = reader.integer("JSM_NAMESPACE_RANK")
        reader.check_below("JSM_NAMESPACE_RANK", global_rank, "JSM_NAMESPACE_SIZE", world_size)
        local_rank = reader.integer("JSM_NAMESPACE_LOCAL_RANK")
        local_world_size = reader.optional_integer("JSM_NAMESPACE_LOCAL_SIZE", minimum=1)
        if local_world_size is not None:
            reader.check_below(
                "JSM_NAMESPACE_LOCAL_RANK", local_rank, "JSM_NAMESPACE_LOCAL_SIZE", local_world_size
            )
        hosts = self._read_hosts(reader.require_text("LSB_DJOB_RANKFILE"))
        return Topology(
            name=self.name,
            world_size=world_size,
            global_rank=global_rank,
            local_rank=local_rank,
            node_rank=self._node_rank(hosts),
            local_world_size=local_world_size,
            num_nodes=len(hosts),
            main_address=reader.text("MASTER_ADDR") or hosts[0],
            main_port=reader.port() or _BASE_PORT + reader.integer("LSB_JOBID") % 1000,
            creates_processes_externally=True,
        )

    def _read_hosts(self, path: str) -> list[str]:
        try:
            text = self.read_text(path)
        except OSError as err:
            raise ValueError(
                f"LSB_DJOB_RANKFILE={path!r} cannot be read ({err.strerror or err}). handloom takes "
                f"the job's hosts from it. {_FIX}"
            ) from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        hosts = list(dict.fromkeys(lines[1:]))
        if not hosts:
            raise ValueError(
                f"LSB_DJOB_RANKFILE={path!r} lists no compute host after the launch host. handloom "
                f"needs one for the main address. {_FIX}"
            )
        return hosts

    def _node_rank(self, hosts: list[str]) -> int:
        hostname = self.hostname or socket.gethostname()
        if hostname in hosts:
            return hosts.index(hostname)
        # The rank file may list short names while gethostname() returns a qualified one.
        short_hosts = [host.split(".")[0] for host in hosts]
        short_name = hostname.split(".")[0]
        if short_name in short_hosts:
            return short_hosts.index(short_name)
        shown = ", ".join(hosts[:5]) + (f", ... ({len(hosts)} hosts)" if len(hosts) > 5 else "")
        raise ValueError(
            f"This host, {hostname!r}, is not among the compute hosts of LSB_DJOB_RANKFILE "
            f"({shown}). handloom numbers the nodes by their place in that file. "
            f"Run the script on the job's compute hosts with jsrun, or pass "
            f"LSFEnvironment(hostname=...) with the name the rank file uses."
        )

    @override
    def __repr__(self) -> str:
        return f"LSFEnvironment(hostname={self.hostname!r})"
