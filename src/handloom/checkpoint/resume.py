"""What a checkpoint records beside the user's state so that a resumed run continues exactly.

Under the reserved key :data:`RESUME_KEY` ``fabric.save`` stores::

    {"format": 1,
     "meta": {"handloom_version", "torch_version", "world_size", "strategy", "precision", "time"},
     "ranks": {rank: {"rng": {...}, "loaders": [loader progress, ...]}},
     "scaler": GradScaler.state_dict() or None}

``ranks`` holds every rank's entry when the save is collective (sharded strategies) and the writing
rank's entry otherwise (single device, DDP: rank 0 writes alone, with no collective). Everything is
made of tensors, numbers, strings and containers, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import random
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

RESUME_KEY = "handloom"
FORMAT_VERSION = 1


class ResumableLoader(Protocol):
    """A set-up dataloader that can report and restore its position (``_FabricDataLoader``)."""

    def progress_state(self) -> dict[str, Any]: ...

    def restore_progress(
        self, state: Mapping[str, Any], *, saved_world_size: int, world_size: int
    ) -> None: ...


def describe(*, strategy: str, precision: str, world_size: int) -> dict[str, Any]:
    """The metadata of a checkpoint written now."""
    from handloom._version import __version__

    return {
        "handloom_version": __version__,
        "torch_version": str(torch.__version__),
        "world_size": world_size,
        "strategy": strategy,
        "precision": precision,
        "time": time.time(),
    }


def capture_rng() -> dict[str, Any]:
    """This process's random states: Python, NumPy (if imported), torch CPU and CUDA (if in use)."""
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        legacy = numpy.random.get_state(legacy=False)
        states["numpy"] = {
            "key": torch.from_numpy(legacy["state"]["key"].astype("int64")),
            "pos": int(legacy["state"]["pos"]),
            "has_gauss": int(legacy["has_gauss"]),
            "gauss": float(legacy["gauss"]),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: Mapping[str, Any]) -> None:
    """Put the random states captured by :func:`capture_rng` back."""
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        import numpy

        saved = states["numpy"]
        key = saved["key"].numpy().astype("uint32")
        numpy.random.set_state(("MT19937", key, saved["pos"], saved["has_gauss"], saved["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = states["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            torch.cuda.set_rng_state(cuda_states[torch.cuda.current_device() % len(cuda_states)])


def rank_entry(loaders: Sequence[ResumableLoader | None]) -> dict[str, Any]:
    """This rank's part: its random states and the progress of each set-up dataloader."""
    return {
        "rng": capture_rng(),
        "loaders": [None if loader is None else loader.progress_state() for loader in loaders],
    }


def build(meta: dict[str, Any], ranks: Mapping[int, Any], scaler: Any) -> dict[str, Any]:
    """The value stored under :data:`RESUME_KEY`."""
    return {
        "format": FORMAT_VERSION,
        "meta": meta,
        "ranks": dict(ranks),
        "scaler": None if scaler is None else scaler.state_dict(),
    }


def restore(
    saved: Mapping[str, Any],
    *,
    rank: int,
    world_size: int,
    loaders: Sequence[ResumableLoader | None],
    scaler: Any,
) -> list[ResumableLoader | None] | list[Any]:
    """Restore random states, the scaler and loader progress from ``saved``.

    Returns the loader entries that found no set-up loader yet (by setup order); Fabric applies
    them to dataloaders set up later.
    """
    if saved.get("format") != FORMAT_VERSION:
        warnings.warn(
            f"The checkpoint's resume state has format {saved.get('format')!r}, which this handloom"
            f" (format {FORMAT_VERSION}) does not know; only the model and optimizer state were restored.",
            stacklevel=3,
        )
        return []
    ranks: Mapping[int, Any] = saved["ranks"]
    saved_world = int(saved["meta"]["world_size"])
    entry = ranks.get(rank)
    if entry is None:  # single-file saves hold the writer's entry; ranks seeded alike share it
        entry = ranks[min(ranks)]
    mid_pass = any(p is not None and not p["finished"] for p in entry["loaders"])
    if saved_world != world_size and rank == 0 and mid_pass:
        warnings.warn(
            f"The checkpoint was written by {_processes(saved_world)} and this run has {world_size}."
            " The epoch and the number of samples consumed are restored; the per-rank random"
            " streams and the exact order of the remaining samples cannot be, so this run will"
            " not match an uninterrupted one bit for bit.",
            stacklevel=4,  # the user's fabric.load call
        )
    restore_rng(entry["rng"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    pending: list[Any] = []
    for index, progress in enumerate(entry["loaders"]):
        loader = loaders[index] if index < len(loaders) else None
        if progress is None:
            pending.append(None)
        elif loader is None:
            pending.append(progress)
        else:
            loader.restore_progress(progress, saved_world_size=saved_world, world_size=world_size)
            pending.append(None)
    return pending


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"
