"""Single-file checkpoints (single-device and DDP training, and full checkpoints of sharded models).

Writes are atomic: the file is written under a temporary name in the target's directory, flushed,
fsynced and renamed over the target, so a crash mid-write leaves the previous checkpoint intact.
Loads use ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from handloom.wrappers import unwrap


def _has_state(obj: object) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def check_filter(state: Mapping[str, Any], filter: object) -> None:
    """Reject a ``filter`` that is not a mapping from keys of ``state`` to callables.

    Raises:
        TypeError: ``filter`` is not a mapping of callables.
        ValueError: ``filter`` names a key that ``state`` lacks.
    """
    if filter is None:
        return
    if not isinstance(filter, Mapping):
        raise TypeError(
            f"fabric.save(filter={filter!r}) must be a dict mapping state keys to functions"
            " `(name, value) -> bool`."
        )
    for key, fn in filter.items():
        if key not in state:
            raise ValueError(
                f"fabric.save(filter=...) names the key {key!r}, which the state does not have."
                f" Use one of: {sorted(state)}."
            )
        if not callable(fn):
            raise TypeError(f"fabric.save(filter={{{key!r}: {fn!r}}}) must map to a function.")


def apply_filter(key: str, plain: Any, filter: Mapping[str, Callable[[str, Any], bool]] | None) -> Any:
    """Keep the entries of the state dict ``plain`` (saved under ``key``) that ``filter[key]`` accepts."""
    if filter is not None and key in filter and isinstance(plain, Mapping):
        return {name: item for name, item in plain.items() if filter[key](name, item)}
    return plain


def collect_state(
    state: Mapping[str, Any], filter: Mapping[str, Callable[[str, Any], bool]] | None
) -> dict[str, Any]:
    """Turn modules, optimizers and other stateful objects in ``state`` into plain state dicts.

    Raises:
        TypeError: ``filter`` is not a mapping of callables.
        ValueError: ``filter`` names a key that ``state`` lacks.
    """
    check_filter(state, filter)
    out: dict[str, Any] = {}
    for key, value in state.items():
        obj = unwrap(value)
        plain = obj.state_dict() if _has_state(obj) else obj
        out[key] = apply_filter(key, plain, filter)
    return out


def write_atomic(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Save ``payload`` with ``torch.save`` to ``path`` so readers see the old file or the new one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_checkpoint(
    path: str | os.PathLike[str], *, weights_only: bool = True, mmap: bool = False
) -> dict[str, Any]:
    """Read a checkpoint file onto the CPU (memory-mapped with ``mmap``, so memory stays bounded).

    Raises:
        FileNotFoundError: No file at ``path``.
        RuntimeError: The file is truncated or not a checkpoint; the message names the file.
    """
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"No checkpoint file at {str(target)!r}. Check the path, or save one first.")
    try:
        data = torch.load(target, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as err:
        raise RuntimeError(
            f"Could not read the checkpoint {str(target)!r}: {err}. The file may be truncated or not"
            " written by torch.save; load another checkpoint."
        ) from err
    if not isinstance(data, dict):
        raise RuntimeError(
            f"The checkpoint {str(target)!r} holds a {type(data).__name__}, not a dict of state."
        )
    return data


def restore_state(state: dict[str, Any], checkpoint: dict[str, Any], strict: bool) -> dict[str, Any]:
    """Load ``checkpoint`` into the objects of ``state`` in place; return the keys ``state`` did not ask for.

    Raises:
        KeyError: ``strict`` and a key of ``state`` is missing from the checkpoint.
    """
    missing = [key for key in state if key not in checkpoint]
    if strict and missing:
        raise KeyError(
            f"The checkpoint has no entry {missing[0]!r} (it holds {sorted(checkpoint)})."
            " Remove the key from the state you load, or pass strict=False."
        )
    for key, value in list(state.items()):
        if key not in checkpoint:
            continue
        obj = unwrap(value)
        if isinstance(obj, torch.nn.Module):
            obj.load_state_dict(checkpoint[key], strict=strict)
        elif _has_state(obj):
            obj.load_state_dict(checkpoint[key])
        else:
            state[key] = checkpoint[key]
    return {key: value for key, value in checkpoint.items() if key not in state}
