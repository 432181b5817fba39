"""The fallback environment: nothing launched us, so handloom starts the processes itself."""

from __future__ import annotations

import os
from collections.abc import Mapping

from typing_extensions import override

from handloom.environments._parse import EnvReader
from handloom.environments.base import ParsedEnvironment, Topology

_DEFAULT_ADDRESS = "127.0.0.1"
_PORT_VAR = "MASTER_PORT"


class LocalEnvironment(ParsedEnvironment):
    """A process started by hand (``python train.py``) that will launch its own workers.

    The topology describes the launching process before launch: one process, rank 0, with the
    per-node process count and the node count left to the launcher's options. On a multi-node
    job started by hand, each node's launcher is told its index with ``NODE_RANK`` (or
    ``GROUP_RANK``) and where to meet with ``MASTER_ADDR`` and ``MASTER_PORT``.

    As in Lightning's default environment, :meth:`world_size` and :meth:`global_rank` are what
    :meth:`set_world_size` and :meth:`set_global_rank` recorded (1 and 0 until then): Fabric
    records them in each process it starts.
    """

    name = "local"

    def __init__(self) -> None:
        self._world_size = 1
        self._global_rank = 0
        self._main_port: int | None = None
        self._exported_port: str | None = None

    @staticmethod
    @override
    def detect(env: Mapping[str, str] | None = None) -> bool:
        """Return True: any process can launch its own workers.

        Args:
            env: The environment variables (unused).

        Returns:
            Always True, which makes this the last resort of detection.
        """
        return True

    @override
    def topology(self, env: Mapping[str, str]) -> Topology:
        """Read where the launching process sits.

        Args:
            env: The environment variables.

        Returns:
            A one-process topology. ``main_port`` is ``None`` when ``MASTER_PORT`` is unset: the
            launcher then picks a free port.

        Raises:
            ValueError: ``NODE_RANK``, ``GROUP_RANK`` or ``MASTER_PORT`` is not a valid number.
        """
        reader = EnvReader(env, launcher="handloom", fix="Set it to a whole number, or unset it.")
        node_rank = reader.optional_integer("NODE_RANK")
        if node_rank is None:
            node_rank = reader.optional_integer("GROUP_RANK")
        return Topology(
            name=self.name,
            world_size=1,
            global_rank=0,
            local_rank=0,
            node_rank=0 if node_rank is None else node_rank,
            local_world_size=None,
            num_nodes=None,
            main_address=reader.text("MASTER_ADDR") or _DEFAULT_ADDRESS,
            main_port=reader.port(),
            creates_processes_externally=False,
        )

    @property
    @override
    def main_port(self) -> int:
        """``MASTER_PORT``, or else a free port, picked once and exported as ``MASTER_PORT``.

        Exporting it lets the processes started from here meet at the same port; :meth:`teardown`
        removes it again.
        """
        if self._main_port is None:
            port = self.current().main_port
            if port is None:
                from handloom.environments.lightning import find_free_network_port

                port = find_free_network_port()
                self._exported_port = os.environ[_PORT_VAR] = str(port)
            self._main_port = port
        return self._main_port

    @override
    def world_size(self) -> int:
        return self._world_size

    @override
    def set_world_size(self, size: int) -> None:
        """Record the number of processes in the job."""
        self._world_size = size

    @override
    def global_rank(self) -> int:
        return self._global_rank

    @override
    def set_global_rank(self, rank: int) -> None:
        """Record this process's global rank."""
        self._global_rank = rank

    @override
    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        """Nothing to check: Fabric starts as many processes as it was asked for."""

    @override
    def teardown(self) -> None:
        """Remove the ``MASTER_PORT`` that :attr:`main_port` exported, if it is still the one it set."""
        if self._exported_port is not None and os.environ.get(_PORT_VAR) == self._exported_port:
            del os.environ[_PORT_VAR]
        self._exported_port = None
