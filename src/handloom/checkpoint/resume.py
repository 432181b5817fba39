"""What an exact resume needs beyond models and optimizers, restored only where ``state`` asks for it.

Two kinds of values in a ``fabric.save`` state differ from one rank to the next:

* :class:`RandomState`: the random states of Python, NumPy (if imported), torch on the CPU and
  CUDA (if in use);
* a set-up dataloader (what ``fabric.setup_dataloaders`` returned) whose DataLoader has no
  ``state_dict`` of its own: how many passes it started and how far the current one got.

Each rank contributes its own entry; a collective save gathers them to the writer, so the
checkpoint holds ``{"world_size": W, "ranks": {rank: entry}}`` under the user's key, and
``fabric.load`` gives each rank its own entry back. Everything is made of tensors, numbers,
strings and containers, so ``torch.load(weights_only=True)`` reads it.

A set-up dataloader whose DataLoader has its own ``state_dict``/``load_state_dict`` (torchdata's
``StatefulDataLoader``, litdata's ``StreamingDataLoader``) is none of handloom's business: it is
saved and restored through those methods, as any other stateful object.
"""

from __future__ import annotations

import random
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from handloom.wrappers import _FabricDataLoader

#: The key under which earlier handloom versions recorded random states, loader positions and the
#: gradient scaler in every checkpoint. Loads drop that entry (see :func:`drop_legacy`).
RESUME_KEY = "handloom"


class RandomState:
    """The random streams of every process, as a value of ``fabric.save``'s state.

    ``fabric.save(path, {..., "rng": RandomState()})`` records the random states of every rank
    (Python, NumPy if it is imported, torch on the CPU, CUDA if in use); ``fabric.load(path,
    {..., "rng": RandomState()})`` restores this rank's own states, so per-rank streams stay
    distinct. Outside ``fabric.save``/``fabric.load``, :meth:`state_dict` and
    :meth:`load_state_dict` capture and restore this process's states.

    Example::

        state = {"model": model, "optimizer": optimizer, "loader": loader, "rng": RandomState()}
        fabric.save("checkpoints/step-100.ckpt", state)
        fabric.load("checkpoints/step-100.ckpt", state)  # continues the same random streams
    """

    def state_dict(self) -> dict[str, Any]:
        """This process's random states."""
        return capture_rng()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Put back random states returned by :meth:`state_dict`."""
        restore_rng(state_dict)

    def __repr__(self) -> str:
        return "RandomState()"


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


def describe(*, strategy: str, precision: str, world_size: int) -> dict[str, Any]:
    """The metadata of a checkpoint written now (a sharded directory's ``handloom.json``)."""
    from handloom._version import __version__

    return {
        "handloom_version": __version__,
        "torch_version": str(torch.__version__),
        "world_size": world_size,
        "strategy": strategy,
        "precision": precision,
        "time": time.time(),
    }


# --- values that differ per rank --------------------------------------------------------------------


def is_resume_value(value: object) -> bool:
    """True for the values :func:`restore` puts back: a set-up dataloader or a :class:`RandomState`."""
    return isinstance(value, (RandomState, _FabricDataLoader))


def _tracked(value: object) -> bool:
    """A value whose per-rank entry handloom records (a loader without its own ``state_dict``)."""
    if isinstance(value, RandomState):
        return True
    return isinstance(value, _FabricDataLoader) and not _has_own_state(value.dataloader)


def _has_own_state(obj: object) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def local_entries(state: Mapping[str, Any]) -> dict[str, Any]:
    """This rank's entry for each per-rank value of ``state``, by key."""
    entries: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, RandomState):
            entries[key] = capture_rng()
        elif _tracked(value):
            entries[key] = value.progress_state()
    return entries


def combine(gathered: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The checkpoint values of per-rank keys, from every rank's :func:`local_entries` (rank order)."""
    keys = dict.fromkeys(key for entries in gathered for key in entries)
    world_size = len(gathered)
    return {
        key: {
            "world_size": world_size,
            "ranks": {rank: entries[key] for rank, entries in enumerate(gathered) if key in entries},
        }
        for key in keys
    }


def restore(
    values: Mapping[str, Any], saved: Mapping[str, Any], *, rank: int, world_size: int, path: object
) -> None:
    """Restore each value of ``values`` from ``saved[key]`` (keys missing from ``saved`` are skipped).

    A loader with its own ``state_dict`` gets ``saved[key]`` through ``load_state_dict``; other
    loaders and :class:`RandomState` take this rank's entry. When the checkpoint was written by
    another number of processes, global rank 0 warns once that the run will not be bit-identical.

    Raises:
        ValueError: ``saved[key]`` is not what handloom records for such a value.
    """
    other_world: int | None = None
    for key, value in values.items():
        if key not in saved:
            continue
        if not _tracked(value):
            value.dataloader.load_state_dict(saved[key])
            continue
        entries, saved_world = _entries(saved[key], key, value, path)
        if saved_world != world_size:
            other_world = saved_world
        if isinstance(value, RandomState):
            if rank in entries:  # another world size: ranks without an entry keep their streams
                restore_rng(entries[rank])
            continue
        entry = entries[rank] if rank in entries else entries[min(entries)]
        value.restore_progress(entry, saved_world_size=saved_world, world_size=world_size)
    if other_world is not None and rank == 0:
        warnings.warn(
            f"The checkpoint was written by {_processes(other_world)} and this run has {world_size}."
            " The epoch and the number of samples consumed are restored; the per-rank random"
            " streams and the exact order of the remaining samples cannot be, so this run will"
            " not match an uninterrupted one bit for bit.",
            stacklevel=4,  # the user's fabric.load call
        )


def _entries(saved: object, key: str, value: object, path: object) -> tuple[dict[int, Any], int]:
    """``(entries by rank, world size)`` of a per-rank value as saved; a clear error for anything else."""
    if isinstance(saved, Mapping) and isinstance(saved.get("ranks"), Mapping) and saved["ranks"]:
        return {int(rank): entry for rank, entry in saved["ranks"].items()}, int(saved["world_size"])
    what = "a set-up dataloader" if isinstance(value, _FabricDataLoader) else "RandomState()"
    raise ValueError(
        f"fabric.load({str(path)!r}, {{{key!r}: {what}}}): the checkpoint's entry {key!r} is of type"
        f" {type(saved).__name__}, not the per-rank entries fabric.save records for {what}. It was saved"
        f" from something else; load it under the key it was saved with, or leave {key!r} out of the state."
    )


def is_legacy_entry(value: object) -> bool:
    """True for the resume state older handloom versions saved under :data:`RESUME_KEY`."""
    return isinstance(value, Mapping) and "format" in value and "ranks" in value


def drop_legacy(checkpoint: dict[str, Any], state: Mapping[str, Any] | None) -> dict[str, Any]:
    """``checkpoint`` without an older handloom's resume entry, unless ``state`` asks for that key."""
    if (state is None or RESUME_KEY not in state) and is_legacy_entry(checkpoint.get(RESUME_KEY)):
        del checkpoint[RESUME_KEY]
    return checkpoint


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"
