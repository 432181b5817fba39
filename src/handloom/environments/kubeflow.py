"""A replica of a Kubeflow ``PyTorchJob``: one pod, one process, variables set by the operator."""

from __future__ import annotations

from collections.abc import Mapping

from typing_extensions import override

from handloom.environments._parse import EnvReader, variables
from handloom.environments.base import ParsedEnvironment, Topology

_FIX = "Check the PyTorchJob spec: the training operator sets these variables for every replica."
_REQUIRED_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


class KubeflowEnvironment(ParsedEnvironment):
    """One process per pod, as a Kubeflow ``PyTorchJob`` without ``nprocPerNode`` runs it.

    Each pod is treated as a node: ``local_rank`` is 0, ``node_rank`` is ``RANK`` and
    ``num_nodes`` is ``WORLD_SIZE``. Jobs that run torchrun in each pod (``nprocPerNode > 1``)
    are torchelastic launches and are read by :class:`TorchElasticEnvironment` instead.
    """

    name = "kubeflow"

    @staticmethod
    @override
    def detect(env: Mapping[str, str] | None = None) -> bool:
        """Return True in a Kubernetes pod that the PyTorchJob operator gave a rank.

        Args:
            env: The environment variables; ``None`` reads this process's (Lightning's ``detect()``).

        Returns:
            Whether ``KUBERNETES_SERVICE_HOST`` and all of ``MASTER_ADDR``, ``MASTER_PORT``,
            ``WORLD_SIZE`` and ``RANK`` are set, and torchelastic did not start the process.
        """
        env = variables(env)
        return (
            "KUBERNETES_SERVICE_HOST" in env
            and all(name in env for name in _REQUIRED_VARS)
            and "TORCHELASTIC_RUN_ID" not in env
        )

    @override
    def topology(self, env: Mapping[str, str]) -> Topology:
        """Read the pod's place from the operator's variables.

        Args:
            env: The environment variables.

        Returns:
            The topology, with one process per node.

        Raises:
            ValueError: A variable is missing or malformed, or ``RANK`` is not below
                ``WORLD_SIZE``.
        """
        reader = EnvReader(env, launcher="Kubeflow PyTorchJob", fix=_FIX)
        world_size = reader.integer("WORLD_SIZE", minimum=1)
        global_rank = reader.integer("RANK")
        reader.check_below("RANK", global_rank, "WORLD_SIZE", world_size)
        return Topology(
            name=self.name,
            world_size=world_size,
            global_rank=global_rank,
            local_rank=0,
            node_rank=global_rank,
            local_world_size=1,
            num_nodes=world_size,
            main_address=reader.require_text("MASTER_ADDR"),
            main_port=reader.require_port(),
            creates_processes_externally=True,
        )
