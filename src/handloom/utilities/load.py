"""Checkpoint loading helpers under the names of ``lightning.fabric.utilities.load``.

Programs written for Lightning (litgpt among them) import these private names directly, so they
exist here with Lightning's signatures. The loading itself is handloom's: ``_lazy_load`` reads a
file with ``torch.load(mmap=True)`` through :func:`handloom.checkpoint.read_checkpoint`, so each
tensor is an ordinary tensor whose bytes are read from the file when first used, and memory holds
only what the program touches. A sharded checkpoint directory is merged by
:func:`handloom.sharding.checkpoint.read_sharded`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from handloom.checkpoint.io import read_checkpoint
from handloom.checkpoint.state import _has_state
from handloom.sharding.checkpoint import META_FILE, read_sharded

__all__ = [
    "_METADATA_FILENAME",
    "_NotYetLoadedTensor",
    "_lazy_load",
    "_load_distributed_checkpoint",
    "_materialize_tensors",
    "_move_state_into",
]

_METADATA_FILENAME = META_FILE
"""The file of a sharded checkpoint directory that holds everything except the sharded tensors."""


class _NotYetLoadedTensor:
    """Lightning's stand-in for a tensor that its ``_lazy_load`` has not read yet.

    handloom's :func:`_lazy_load` memory-maps the file instead, and every value it returns is a
    plain ``torch.Tensor``; no instance of this class is ever made. The name stays importable for
    code that annotates with it or tests ``isinstance(value, _NotYetLoadedTensor)``: that code
    takes its plain-tensor branch, which is correct for a memory-mapped tensor.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "_NotYetLoadedTensor(...) cannot be created: handloom's _lazy_load returns memory-mapped"
            " torch.Tensor values instead of placeholders. Call _lazy_load(path) and use its tensors"
            " directly."
        )

    def _load_tensor(self) -> torch.Tensor:  # pragma: no cover - no instance can exist
        """The tensor read from the file (present for the type's interface only)."""
        raise NotImplementedError


def _lazy_load(filename: str | os.PathLike[str]) -> Any:
    """Open a ``torch.save`` file without reading its tensors into memory yet.

    Tensors are memory-mapped onto the CPU: ``model.load_state_dict(_lazy_load(path))`` copies each
    parameter straight from the file. Like Lightning's, it unpickles any object the file holds, so
    load only files you trust.

    Args:
        filename: A file written by ``torch.save`` (the zip format, the default since torch 1.6).

    Returns:
        The saved object, with memory-mapped tensors.

    Raises:
        FileNotFoundError: No file at ``filename``.
        RuntimeError: The file is truncated, damaged, not a checkpoint, or does not hold a dict.
    """
    return read_checkpoint(filename, weights_only=False, mmap=True)


def _materialize_tensors(collection: Any) -> Any:
    """``collection`` with every not-yet-loaded tensor replaced by its value.

    ``_lazy_load`` yields ordinary (memory-mapped) tensors, so there is nothing to replace: the
    collection is returned as it is, usable at once.
    """
    return collection


def _move_state_into(
    source: dict[str, Any], destination: dict[str, Any], keys: set[str] | None = None
) -> None:
    """Move the entries ``keys`` (all when ``None``) from ``source`` into ``destination``.

    An entry whose destination object has ``state_dict``/``load_state_dict`` is loaded into that
    object in place; any other entry replaces the destination's value. Moved keys are removed from
    ``source``; keys that ``source`` lacks are skipped.
    """
    chosen = set(source) if keys is None else keys & set(source)
    for key in chosen:
        value = source.pop(key)
        if key in destination and _has_state(destination[key]):
            destination[key].load_state_dict(value)
        else:
            destination[key] = value


def _load_distributed_checkpoint(checkpoint_folder: Path) -> dict[str, Any]:
    """Read a sharded checkpoint directory into one dict of full CPU tensors and saved values.

    Raises:
        FileNotFoundError: ``checkpoint_folder`` is not a complete sharded checkpoint.
        RuntimeError: A file of the checkpoint is damaged; the message names it.
    """
    return read_sharded(checkpoint_folder)
