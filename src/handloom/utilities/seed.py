"""``lightning.fabric.utilities.seed``: the seeding functions of :mod:`handloom.seed`."""

from __future__ import annotations

from handloom.seed import _MAX_SEED, pl_worker_init_function, reset_seed, seed_everything

__all__ = ["max_seed_value", "min_seed_value", "pl_worker_init_function", "reset_seed", "seed_everything"]

max_seed_value = _MAX_SEED
min_seed_value = 0
