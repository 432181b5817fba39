"""The fallback environment: nothing launched us, so handloom starts the processes itself."""

from __future__ import annotations

from collections.abc import Mapping

from typing_extensions import override

from handloom.environments._parse import EnvReader
from handloom.environments.base import ClusterEnvironment, Topology

_DEFAULT_ADDRESS = "127.0.0.1"


class LocalEnvironment(ClusterEnvironment):
    """A process started by hand (``python train.py``) that will launch its own workers.

    The topology describes the launching process before launch: one process, rank 0, with the
    per-node process count and the node count left to the launcher's options. On a multi-node
    job started by hand, each node's launcher is told its index with ``NODE_RANK`` (or
    ``GROUP_RANK``) and where to meet with ``MASTER_ADDR`` and ``MASTER_PORT``.
    """

    name = "local"

    @staticmethod
    @override
    def detect(env: Mapping[str, str]) -> bool:
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
