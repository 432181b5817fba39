"""How FSDP's sharding strategy names map onto FSDP2: the mesh shape and when to reshard (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SHARDING_STRATEGIES: tuple[str, ...] = (
    "FULL_SHARD",
    "SHARD_GRAD_OP",
    "NO_SHARD",
    "HYBRID_SHARD",
    "_HYBRID_SHARD_ZERO2",
)
STATE_DICT_TYPES: tuple[str, ...] = ("sharded", "full")
REPLICATE_DIM = "dp_replicate"
SHARD_DIM = "dp_shard"


@dataclass(frozen=True)
class ShardingLayout:
    """Where parameters live across processes.

    Attributes:
        mesh_shape: ``(shard,)`` for plain sharding, ``(replicate, shard)`` for hybrid sharding.
        mesh_dim_names: Names of the mesh dimensions.
        reshard_after_forward: Free the gathered parameters after forward (``FULL_SHARD``) or keep
            them until backward (``SHARD_GRAD_OP``).
    """

    mesh_shape: tuple[int, ...]
    mesh_dim_names: tuple[str, ...]
    reshard_after_forward: bool


def resolve_sharding_strategy(value: object) -> str:
    """Accept a name (any case) or a ``torch.distributed.fsdp.ShardingStrategy`` member.

    Raises:
        ValueError: Not a known sharding strategy; the message names it.
    """
    name = getattr(value, "name", value)
    if isinstance(name, str) and name.upper() in SHARDING_STRATEGIES:
        return name.upper()
    choices = ", ".join(repr(s) for s in SHARDING_STRATEGIES if not s.startswith("_"))
    raise ValueError(
        f"FSDPStrategy(sharding_strategy={value!r}) is not a sharding strategy. Choose one of: {choices}."
    )


def resolve_state_dict_type(value: object) -> str:
    """Raises ValueError unless ``value`` is ``"sharded"`` or ``"full"``."""
    if isinstance(value, str) and value.lower() in STATE_DICT_TYPES:
        return value.lower()
    raise ValueError(
        f"FSDPStrategy(state_dict_type={value!r}) is not a checkpoint format. Choose 'sharded' (a directory"
        " every rank writes; reshards on load) or 'full' (one file, loadable with torch.load)."
    )


def check_mesh_shape(device_mesh: object) -> tuple[int, int] | None:
    """Validate ``device_mesh`` when it is a shape; ``None`` when it is absent or a ``DeviceMesh``.

    Raises:
        ValueError: A shape that is not two positive integers.
    """
    if device_mesh is None or not isinstance(device_mesh, (tuple, list)):
        return None
    if len(device_mesh) != 2 or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in device_mesh
    ):
        raise ValueError(
            f"FSDPStrategy(device_mesh={device_mesh!r}) must be a (replicate, shard) pair of positive"
            " integers,"
            " for example (2, 4) for 2 groups of 4 processes, or a torch DeviceMesh."
        )
    return int(device_mesh[0]), int(device_mesh[1])


def resolve_layout(
    sharding_strategy: str, mesh_shape: tuple[int, int] | None, world_size: int, num_nodes: int
) -> ShardingLayout:
    """The layout for a sharding strategy on ``world_size`` processes over ``num_nodes`` nodes.

    ``HYBRID_SHARD`` shards within a node and replicates across nodes unless ``mesh_shape``
    says otherwise; ``NO_SHARD`` replicates everywhere (each process holds the whole model, as in
    DDP). A ``mesh_shape`` with more than one replica makes any strategy hybrid.

    Raises:
        ValueError: ``mesh_shape`` does not multiply to ``world_size``, or is combined with ``NO_SHARD``.
    """
    reshard = sharding_strategy in ("FULL_SHARD", "HYBRID_SHARD")
    if mesh_shape is not None:
        if mesh_shape[0] * mesh_shape[1] != world_size:
            raise ValueError(
                f"FSDPStrategy(device_mesh={mesh_shape!r}) describes"
                f" {mesh_shape[0] * mesh_shape[1]} processes,"
                f" but the job has {world_size}. Make replicate x shard equal the number of processes."
            )
        if sharding_strategy == "NO_SHARD":
            raise ValueError(
                f"FSDPStrategy(sharding_strategy='NO_SHARD', device_mesh={mesh_shape!r}): NO_SHARD replicates"
                " the model on every process and takes no mesh. Drop device_mesh, or use 'HYBRID_SHARD'."
            )
        return ShardingLayout(mesh_shape, (REPLICATE_DIM, SHARD_DIM), reshard)
    if sharding_strategy == "NO_SHARD":
        return ShardingLayout((world_size, 1), (REPLICATE_DIM, SHARD_DIM), False)
    if sharding_strategy in ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"):
        per_node = max(1, world_size // num_nodes)
        return ShardingLayout((world_size // per_node, per_node), (REPLICATE_DIM, SHARD_DIM), reshard)
    return ShardingLayout((world_size,), (SHARD_DIM,), reshard)


# fully_shard options of FSDP1 that FSDP2 has no use for: accepted for compatibility and ignored.
FSDP1_ONLY_OPTIONS: frozenset[str] = frozenset(
    {"limit_all_gathers", "use_orig_params", "forward_prefetch", "backward_prefetch", "sync_module_states"}
)


def split_fsdp_kwargs(kwargs: dict[str, Any], accepted: frozenset[str]) -> tuple[dict[str, Any], list[str]]:
    """Split extra ``FSDPStrategy`` keyword arguments into ``fully_shard`` options and FSDP1-only ones.

    Raises:
        TypeError: A name that neither ``fully_shard`` nor FSDP1 knows.
    """
    ignored = sorted(k for k in kwargs if k in FSDP1_ONLY_OPTIONS)
    unknown = sorted(k for k in kwargs if k not in FSDP1_ONLY_OPTIONS and k not in accepted)
    if unknown:
        raise TypeError(
            f"FSDPStrategy({unknown[0]}=...) is not an option of FSDPStrategy or of FSDP2's fully_shard."
            f" fully_shard takes: {', '.join(sorted(accepted))}."
        )
    return {k: v for k, v in kwargs.items() if k not in FSDP1_ONLY_OPTIONS}, ignored
