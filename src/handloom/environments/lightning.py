"""Lightning's default environment: a process started by hand, or every process started by hand."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace

from typing_extensions import override

from handloom.environments._parse import EnvReader
from handloom.environments.base import Topology
from handloom.environments.local import LocalEnvironment

__all__ = ["LightningEnvironment", "find_free_network_port"]

_FIX = "Set it to a whole number, or unset it."


class LightningEnvironment(LocalEnvironment):
    """The environment Lightning uses when no cluster launcher is detected, in its two modes.

    1. ``python train.py`` with no ``LOCAL_RANK`` set: Fabric starts the workers itself, exactly as
       with :class:`LocalEnvironment` (handloom's default).
    2. Every process started by hand (or by a launcher that sets only ``LOCAL_RANK``, such as
       DeepSpeed's) with at least ``LOCAL_RANK`` set, and ``NODE_RANK``, ``MASTER_ADDR`` and
       ``MASTER_PORT`` as needed: Fabric starts nothing. The world size is then
       ``devices * num_nodes`` and the global rank ``node_rank * devices + local_rank``, which
       Fabric records with :meth:`set_world_size` and :meth:`set_global_rank`.

    Example::

        # on each node, for LOCAL_RANK in 0..3:
        #   MASTER_ADDR=node0 MASTER_PORT=29500 NODE_RANK=$NODE LOCAL_RANK=$R python train.py
        fabric = Fabric(devices=4, num_nodes=2, plugins=[LightningEnvironment()])
    """

    name = "lightning"

    @override
    def topology(self, env: Mapping[str, str]) -> Topology:
        """Read where this process sits.

        Args:
            env: The environment variables.

        Returns:
            Without ``LOCAL_RANK``: the launching process, as :class:`LocalEnvironment` reads it.
            With it: a process started outside Fabric, with the recorded world size and global rank.

        Raises:
            ValueError: ``LOCAL_RANK``, ``NODE_RANK``, ``GROUP_RANK`` or ``MASTER_PORT`` is not a
                valid number.
        """
        launching = super().topology(env)
        local_rank = EnvReader(env, launcher="the process's starter", fix=_FIX).optional_integer("LOCAL_RANK")
        if local_rank is None:
            return launching
        return replace(
            launching,
            world_size=self._world_size,
            global_rank=self._global_rank,
            local_rank=local_rank,
            creates_processes_externally=True,
        )


def find_free_network_port() -> int:
    """A free TCP port on this machine, or ``STANDALONE_PORT`` when that is set (as in Lightning).

    Returns:
        The port number.
    """
    standalone = os.environ.get("STANDALONE_PORT")
    if standalone:
        return int(standalone)
    from handloom.launcher import find_free_port

    return find_free_port()
