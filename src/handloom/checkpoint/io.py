"""Reading and writing one checkpoint file, so that a crash never leaves a half-written one.

A write goes to a temporary name in the target's directory (``.<name>.<random>.tmp``), is flushed
and fsynced, and is then renamed over the target; the directory is fsynced after the rename. A
reader therefore sees the previous file or the new one, never a mix. A crash leaves at most a
temporary file behind, which :mod:`handloom.checkpoint.folder` recognises and removes.

Reads use ``torch.load(weights_only=True)`` unless the caller opts out, and turn torch's low-level
errors into messages that name the file and say what is wrong with it.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

TEMP_SUFFIX = ".tmp"


def temp_prefix(target: Path) -> str:
    """The prefix of the temporary names used while ``target`` is being written."""
    return f".{target.name}."


def fsync_directory(path: Path) -> None:
    """Make a rename or a new entry in the directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], payload: Any) -> None:
    """Save ``payload`` with ``torch.save`` at ``path`` so readers see the old file or the new one."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(
            f"Cannot write the checkpoint file {str(target)!r}: a directory (perhaps a sharded"
            " checkpoint) is at that path. Choose another path or remove the directory."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)  # a path, not a handle: torch writes it with its own C++ writer
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def read_checkpoint(
    path: str | os.PathLike[str], *, weights_only: bool = True, mmap: bool = False
) -> dict[str, Any]:
    """Read a checkpoint file onto the CPU (memory-mapped with ``mmap``, so memory stays bounded).

    Raises:
        FileNotFoundError: No file at ``path``.
        RuntimeError: The file is truncated, corrupted or not a checkpoint; the message names it.
        pickle.UnpicklingError: ``weights_only`` and the file holds other pickled objects; the
            message names them and the two ways to allow them.
    """
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(_missing_message(target))
    try:
        data = torch.load(target, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError as err:
        if not weights_only:
            raise RuntimeError(_corrupt_message(target, err)) from err
        raise pickle.UnpicklingError(
            f"The checkpoint {str(target)!r} holds pickled objects that a safe load refuses"
            f" (torch.load(weights_only=True) said: {_first_line(err)}). If you trust the file, either"
            " allow those classes with torch.serialization.add_safe_globals([...]) before loading,"
            " or pass weights_only=False to fabric.load / fabric.load_raw."
        ) from err
    except Exception as err:
        raise RuntimeError(_corrupt_message(target, err)) from err
    if not isinstance(data, dict):
        raise RuntimeError(
            f"The checkpoint {str(target)!r} holds a {type(data).__name__}, not a dict of state."
            " fabric.load reads files written by fabric.save or torch.save(dict); use"
            " fabric.load_raw for a bare state_dict of one module."
        )
    return data


def _missing_message(target: Path) -> str:
    leftovers = sorted(p.name for p in target.parent.glob(f"{temp_prefix(target)}*{TEMP_SUFFIX}"))
    if leftovers:
        return (
            f"No checkpoint file at {str(target)!r}; only {leftovers[0]!r} is there, left by a save that"
            " was interrupted before it finished. The interrupted save is lost; load an earlier"
            " checkpoint."
        )
    return f"No checkpoint file at {str(target)!r}. Check the path, or save one first."


def _corrupt_message(target: Path, err: BaseException) -> str:
    size = target.stat().st_size
    if size == 0:
        what = "it is empty"
    elif not zipfile.is_zipfile(target):
        what = f"it is not a torch.save archive ({size} bytes; the end of the file is missing or damaged)"
    else:
        what = f"it could not be decoded ({size} bytes)"
    return (
        f"Could not read the checkpoint {str(target)!r}: {what}. torch said: {_first_line(err)}."
        " The file is truncated or corrupted (handloom's own saves are atomic, so it was probably copied"
        " or written by another tool); load another checkpoint."
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
