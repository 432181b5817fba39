"""Seeding: one call seeds ``random``, NumPy and torch; :class:`WorkerSeeder` seeds DataLoader workers.

As in Lightning, :func:`seed_everything` exports the seed and the ``workers`` flag as
``PL_GLOBAL_SEED`` and ``PL_SEED_WORKERS``, so processes started afterwards (``ddp_spawn`` and
script relaunches, DataLoader workers) inherit them: :func:`reset_seed` re-applies them and
:func:`current_seed` reads them in a process that never called :func:`seed_everything`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import SupportsInt

import torch
from torch.utils.data import get_worker_info

__all__ = [
    "GLOBAL_SEED_VAR",
    "SEED_WORKERS_VAR",
    "WorkerSeeder",
    "current_seed",
    "pl_worker_init_function",
    "reset_seed",
    "seed_everything",
    "seed_workers_enabled",
]

# Lightning's names: written by seed_everything(), read by it without a seed and by reset_seed().
GLOBAL_SEED_VAR = "PL_GLOBAL_SEED"
SEED_WORKERS_VAR = "PL_SEED_WORKERS"

_MAX_SEED = 2**32 - 1
_log = logging.getLogger("handloom")

# What the last seed_everything() call in this process chose (None: never called here).
_current_seed: int | None = None
_seed_workers = False


def seed_everything(
    seed: SupportsInt | str | None = None,
    workers: bool = False,
    verbose: bool = True,
    *,
    rank: int | None = None,
) -> int:
    """Seed Python's ``random``, NumPy (when installed) and torch (every device) in this process.

    The seed and the ``workers`` flag are remembered for :func:`current_seed` and
    :func:`seed_workers_enabled`, which the DataLoader setup reads to seed workers and samplers,
    and exported as ``PL_GLOBAL_SEED`` and ``PL_SEED_WORKERS`` (``"1"``/``"0"``) in
    ``os.environ`` for the processes started later, as Lightning does.

    Args:
        seed: A value in ``[0, 2**32 - 1]``. As in Lightning, anything ``int()`` converts is
            accepted: ``"42"`` is 42 and a float is truncated (``3.7`` is 3). ``None`` reads
            ``PL_GLOBAL_SEED`` from the environment, and falls back to 0 when it is not set (with
            a warning on rank 0 when ``verbose``).
        workers: Record that DataLoader workers should be seeded with :class:`WorkerSeeder`.
        verbose: Log the chosen seed at INFO level on the ``"handloom"`` logger.
        rank: Opt-in per-process offset. When given, the generators are seeded with a value
            derived from ``(seed, rank)``, so ranks draw different random numbers (useful for
            per-rank augmentation or dropout); the recorded and returned seed stays ``seed``.
            Leave it ``None`` where ranks must draw identically, for example when every rank
            initialises the same replicated weights.

    Returns:
        The seed that was applied (before any ``rank`` offset).

    Raises:
        TypeError: ``seed`` is a bool or has no integer value (a list, for example), or ``rank``
            is not an integer.
        ValueError: ``seed`` is a string that is not a whole number, is NaN or infinite, or is
            outside the uint32 range; ``rank`` is negative; or ``PL_GLOBAL_SEED`` is not an
            integer.
    """
    global _current_seed, _seed_workers
    seed = _seed_from_environment(verbose) if seed is None else _seed_as_int(seed)
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(
            f"seed_everything(seed={seed}) is outside the range NumPy accepts. "
            f"Pass a seed in [0, {_MAX_SEED}]."
        )
    applied = seed
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(
                f"seed_everything(rank={rank!r}) is not a process rank. Pass an int >= 0, "
                "for example fabric.global_rank, or leave rank=None to seed every rank alike."
            )
        applied = _mix(seed, rank, tag="rank") & _MAX_SEED

    random.seed(applied)
    torch.manual_seed(applied)
    np = _maybe_numpy()
    if np is not None:
        np.random.seed(applied)

    _current_seed = seed
    _seed_workers = bool(workers)
    os.environ[GLOBAL_SEED_VAR] = str(seed)
    os.environ[SEED_WORKERS_VAR] = "1" if workers else "0"
    if verbose:
        _log.info("Seed set to %d%s", seed, "" if rank is None else f" (offset for rank {rank})")
    return seed


def current_seed() -> int | None:
    """Return the seed of the last :func:`seed_everything` call.

    In a process that never called it, the seed a parent exported in ``PL_GLOBAL_SEED``, else
    ``None``.
    """
    if _current_seed is not None:
        return _current_seed
    raw = os.environ.get(GLOBAL_SEED_VAR, "").strip()
    return int(raw) if raw.isdigit() else None


def seed_workers_enabled() -> bool:
    """Return the ``workers`` flag of the last :func:`seed_everything` call.

    In a process that never called it, whether a parent exported ``PL_SEED_WORKERS=1``.
    """
    if _current_seed is not None:
        return _seed_workers
    return os.environ.get(SEED_WORKERS_VAR, "0").strip() == "1"


def reset_seed() -> None:
    """Seed again with what :func:`seed_everything` exported (``PL_GLOBAL_SEED``, ``PL_SEED_WORKERS``).

    Does nothing when ``PL_GLOBAL_SEED`` is not set. A ``rank`` offset given to
    :func:`seed_everything` is not re-applied.

    Raises:
        ValueError: ``PL_GLOBAL_SEED`` or ``PL_SEED_WORKERS`` is not an integer.
    """
    raw = os.environ.get(GLOBAL_SEED_VAR)
    if raw is None:
        return
    workers = os.environ.get(SEED_WORKERS_VAR, "0")
    try:
        enabled = bool(int(workers))
    except ValueError:
        raise ValueError(
            f"{SEED_WORKERS_VAR}={workers!r} is not an integer. Set it to 1 or 0, or call"
            " seed_everything(seed, workers=...) instead of reset_seed()."
        ) from None
    seed_everything(_parse_environment_seed(raw), workers=enabled, verbose=False)


def pl_worker_init_function(worker_id: int, rank: int | None = None) -> None:
    """Seed a DataLoader worker's generators (Lightning's ``worker_init_fn``), with :class:`WorkerSeeder`.

    Args:
        worker_id: The worker index, as PyTorch passes it.
        rank: The global rank; ``rank_zero_only.rank`` when ``None``.
    """
    from handloom.utilities.rank_zero import rank_zero_only

    global_rank = rank if rank is not None else (rank_zero_only.rank or 0)
    WorkerSeeder(rank=global_rank, base_seed=current_seed() or 0)(worker_id)


@dataclass(frozen=True)
class WorkerSeeder:
    """A picklable ``worker_init_fn`` that gives every (rank, worker) its own random streams.

    Without it, DataLoader workers on different ranks start from the same seeds (every rank
    runs the same ``seed_everything``), so random augmentations repeat across ranks. The
    seeder hashes ``(base_seed, rank, worker_id, worker seed)`` with BLAKE2b and seeds
    ``random``, NumPy (when installed) and torch from the digest. PyTorch gives each worker a
    fresh seed (``get_worker_info().seed``) every time workers start (drawn from the loader's
    generator or the global torch RNG), so the streams also change from epoch to epoch while
    staying reproducible under a fixed seed.

    Args:
        rank: The global rank of this process.
        base_seed: The run's seed, usually :func:`current_seed`.
        worker_init_fn: The user's own ``worker_init_fn``; it runs after seeding.

    Example:
        >>> loader = DataLoader(ds, num_workers=4, worker_init_fn=WorkerSeeder(rank=1, base_seed=42))
    """

    rank: int
    base_seed: int
    worker_init_fn: Callable[[int], None] | None = None

    def __post_init__(self) -> None:
        for name in ("rank", "base_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"WorkerSeeder({name}={value!r}) is invalid. Pass an int >= 0.")
        if self.worker_init_fn is not None and not callable(self.worker_init_fn):
            raise TypeError(
                f"WorkerSeeder(worker_init_fn={self.worker_init_fn!r}) is not callable. "
                "Pass a function taking the worker id, or None."
            )

    def __call__(self, worker_id: int) -> None:
        """Seed this worker's generators, then call the user's ``worker_init_fn`` if any.

        Args:
            worker_id: The DataLoader worker index, as PyTorch passes it.
        """
        info = get_worker_info()
        # PyTorch's per-worker seed; it is fresh each time workers start, so epochs differ.
        # Called outside a worker (in tests, or by hand) there is none and 0 stands in.
        worker_seed = 0 if info is None else info.seed
        key = (self.base_seed, self.rank, worker_id, worker_seed)
        random.seed(_mix(*key, tag="random"))
        torch.manual_seed(_mix(*key, tag="torch") & (2**63 - 1))
        np = _maybe_numpy()
        if np is not None:
            digest = _mix(*key, tag="numpy")
            # The legacy global NumPy RNG takes at most uint32 words; four of them keep 128 bits.
            np.random.seed([(digest >> (32 * i)) & _MAX_SEED for i in range(4)])
        if self.worker_init_fn is not None:
            self.worker_init_fn(worker_id)


def _mix(*values: int, tag: str) -> int:
    """Hash integers into a 128-bit integer; ``tag`` separates the streams of different libraries."""
    text = ":".join([tag, *(str(v) for v in values)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest(), "little")


def _seed_as_int(seed: SupportsInt | str) -> int:
    """Convert ``seed`` with ``int()`` as Lightning does, with errors that name the call."""
    if isinstance(seed, bool):
        # int(True) is 1, but a flag passed as the seed is almost surely a misplaced argument.
        raise TypeError(
            f"seed_everything(seed={seed!r}) got a bool. Pass a whole number in [0, {_MAX_SEED}]."
        )
    if isinstance(seed, int):
        return seed
    if isinstance(seed, str):
        try:
            return int(seed)
        except ValueError:
            raise ValueError(
                f"seed_everything(seed={seed!r}) is not a whole number. "
                f"Pass an int, or a string of digits, in [0, {_MAX_SEED}]."
            ) from None
    try:
        return int(seed)
    except (ValueError, OverflowError):
        # float("nan") and float("inf") have no integer value.
        raise ValueError(
            f"seed_everything(seed={seed!r}) has no integer value. Pass a whole number in [0, {_MAX_SEED}]."
        ) from None
    except TypeError:
        raise TypeError(
            f"seed_everything(seed={seed!r}) needs a number, got {type(seed).__name__}. "
            f"Pass a whole number in [0, {_MAX_SEED}]."
        ) from None


def _seed_from_environment(verbose: bool) -> int:
    raw = os.environ.get(GLOBAL_SEED_VAR)
    if raw is None:
        if verbose:
            from handloom.utilities.rank_zero import rank_zero_warn

            rank_zero_warn(
                f"seed_everything() was called without a seed and {GLOBAL_SEED_VAR} is not set, "
                "so the seed is 0. Pass seed=... to choose one.",
                stacklevel=6,  # the caller of seed_everything()
            )
        return 0
    return _parse_environment_seed(raw)


def _parse_environment_seed(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"{GLOBAL_SEED_VAR}={raw!r} is not an integer. "
            f"Set it to a whole number in [0, {_MAX_SEED}] or pass seed=... to seed_everything()."
        ) from None


def _maybe_numpy() -> ModuleType | None:
    try:
        import numpy
    except ImportError:
        return None
    return numpy
