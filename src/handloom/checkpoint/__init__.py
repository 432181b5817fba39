"""Checkpoints: crash-safe files and sharded directories, exact resume, async saves, retention.

Public helpers (``from handloom.checkpoint import ...``):

* :class:`RandomState`: put it in ``fabric.save``'s state to record every rank's random
  streams; ``fabric.load`` restores this rank's.
* :class:`CheckpointFolder` / :func:`latest_checkpoint`: numbered checkpoints in a directory, the
  newest complete one, keeping the last K.
* :func:`consolidate`: merge a sharded checkpoint into one ``torch.load``-able file (also
  ``handloom consolidate CKPT_DIR OUT_FILE``).
* :class:`CheckpointSaveError`: raised when a background save failed.
* :data:`RESUME_KEY`: the key under which earlier handloom versions recorded resume state in
  every checkpoint; loads drop that entry.

The modules: :mod:`.io` (atomic file writes, checked reads), :mod:`.state` (user state to and
from state dicts), :mod:`.resume` (random states and loader positions per rank),
:mod:`.staging` (committing sharded directories), :mod:`.background` (async saves),
:mod:`.folder` (retention), :mod:`.consolidate`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from handloom.checkpoint.consolidate import consolidate
from handloom.checkpoint.io import read_checkpoint, write_atomic
from handloom.checkpoint.resume import RESUME_KEY, RandomState
from handloom.checkpoint.state import apply_filter, check_filter, collect_state, restore_state

if TYPE_CHECKING:
    from handloom.checkpoint.background import CheckpointSaveError
    from handloom.checkpoint.folder import CheckpointFolder, latest_checkpoint

__all__ = [
    "RESUME_KEY",
    "CheckpointFolder",
    "CheckpointSaveError",
    "RandomState",
    "apply_filter",
    "check_filter",
    "collect_state",
    "consolidate",
    "latest_checkpoint",
    "read_checkpoint",
    "restore_state",
    "write_atomic",
]

_LAZY = {
    "CheckpointFolder": "handloom.checkpoint.folder",
    "latest_checkpoint": "handloom.checkpoint.folder",
    "CheckpointSaveError": "handloom.checkpoint.background",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'handloom.checkpoint' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
