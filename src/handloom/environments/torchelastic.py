"""Processes started by torchrun (``torch.distributed.run``) or any torchelastic agent."""

from __future__ import annotations

from collections.abc import Mapping

from typing_extensions import override

from handloom.environments._parse import EnvReader, variables
from handloom.environments.base import ParsedEnvironment, Topology

_FIX = "Start the script with torchrun (or handloom run) and do not override the variables it sets."


class TorchElasticEnvironment(ParsedEnvironment):
    """A worker of a torchelastic agent: torchrun, ``handloom run``, or Kubeflow's elastic jobs.

    The agent sets every rank variable for each worker it starts (see
    ``torch.distributed.elastic.agent.server.local_elastic_agent``); ``GROUP_RANK`` is the node
    index and ``GROUP_WORLD_SIZE`` the node count.
    """

    name = "torchelastic"

    @staticmethod
    @override
    def detect(env: Mapping[str, str] | None = None) -> bool:
        """Return True when a torchelastic agent started this process.

        Args:
            env: The environment variables; ``None`` reads this process's (Lightning's ``detect()``).

        Returns:
            Whether ``TORCHELASTIC_RUN_ID`` is set, the same test as
            ``torch.distributed.is_torchelastic_launched``.
        """
        return "TORCHELASTIC_RUN_ID" in variables(env)

    @override
    def topology(self, env: Mapping[str, str]) -> Topology:
        """Read the worker's place from the agent's variables.

        Args:
            env: The environment variables.

        Returns:
            The topology. ``num_nodes`` is ``GROUP_WORLD_SIZE``, or ``WORLD_SIZE //
            LOCAL_WORLD_SIZE`` when only that is known and divides evenly, else ``None``.

        Raises:
            ValueError: A rank variable or ``MASTER_ADDR``/``MASTER_PORT`` is missing, is not a
                valid number, or a rank is not below its size.
        """
        reader = EnvReader(env, launcher="torchrun", fix=_FIX)
        world_size = reader.integer("WORLD_SIZE", minimum=1)
        global_rank = reader.integer("RANK")
        reader.check_below("RANK", global_rank, "WORLD_SIZE", world_size)
        local_rank = reader.integer("LOCAL_RANK")
        node_rank = reader.integer("GROUP_RANK")
        local_world_size = reader.optional_integer("LOCAL_WORLD_SIZE", minimum=1)
        if local_world_size is not None:
            reader.check_below("LOCAL_RANK", local_rank, "LOCAL_WORLD_SIZE", local_world_size)
        num_nodes = reader.optional_integer("GROUP_WORLD_SIZE", minimum=1)
        if num_nodes is not None:
            reader.check_below("GROUP_RANK", node_rank, "GROUP_WORLD_SIZE", num_nodes)
        elif local_world_size is not None and world_size % local_world_size == 0:
            num_nodes = world_size // local_world_size
        return Topology(
            name=self.name,
            world_size=world_size,
            global_rank=global_rank,
            local_rank=local_rank,
            node_rank=node_rank,
            local_world_size=local_world_size,
            num_nodes=num_nodes,
            main_address=reader.require_text("MASTER_ADDR"),
            main_port=reader.require_port(),
            creates_processes_externally=True,
            restart_count=reader.optional_integer("TORCHELASTIC_RESTART_COUNT") or 0,
            agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        )
