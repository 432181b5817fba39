"""Reading and writing one checkpoint file, so that a crash never leaves a half-written one.

A write goes to a temporary name in the target's directory (``.<name>.<random>.tmp``), is flushed
and fsynced, and is then renamed over the target; the directory is fsynced after the rename. A
reader therefore sees the previous file or the new one, never a mix. A crash leaves at most a
temporary file behind, which :mod:`handloom.checkpoint.folder` recognises and removes.

Reads use ``torch.load(weights_only=True)`` unless the caller opts out, and turn torch's low-level
errors into messages that name the file and say what is wrong with it.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import secrets
import zipfile
from pathlib import Path
from typing import Any

import torch

from handloom.validation import describe

TEMP_SUFFIX = ".tmp"
# How a file written by torch.save(_use_new_zipfile_serialization=False) starts: the pickled magic
# number (LONG1 opcode, 10 bytes), after the protocol header.
_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[2:-1]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def temp_prefix(target: Path) -> str:
    """The prefix of the temporary names used while ``target`` is being written."""
    return f".{target.name}."


def fsync_directory(path: Path) -> None:
    """Make a rename or a new entry in the directory ``path`` durable (where the file system can)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        # Some file systems (network mounts, FUSE) cannot fsync a directory; their renames are
        # durable on their own terms, and failing the save over it would lose the checkpoint.
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _create_temp(target: Path) -> Path:
    """A new, empty temporary file beside ``target``, with the permissions a plain ``open`` would give.

    ``tempfile.mkstemp`` would create it readable by its owner only (0600), and the rename would
    carry that over to the checkpoint; here the process umask applies, as for ``torch.save(path)``.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = target.parent / f"{temp_prefix(target)}{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"Could not create a temporary file beside {str(target)!r}.")


def write_atomic(path: str | os.PathLike[str], payload: Any) -> None:
    """Save ``payload`` with ``torch.save`` at ``path`` so readers see the old file or the new one.

    Raises:
        IsADirectoryError: A directory is at ``path``.
        NotADirectoryError: A file is where one of the parent directories of ``path`` belongs.
        TypeError: ``payload`` holds an object that cannot be pickled; the message names its entry.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(
            f"Cannot write the checkpoint file {str(target)!r}: a directory (perhaps a sharded"
            " checkpoint) is at that path. Choose another path or remove the directory."
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        blocker = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
        if blocker is None:
            raise
        raise NotADirectoryError(
            f"Cannot write the checkpoint file {str(target)!r}: {str(blocker)!r} is a file, not a"
            " directory. Choose a path inside a directory, or move that file away."
        ) from err
    tmp = _create_temp(target)
    try:
        try:
            torch.save(payload, str(tmp))  # a path, not a handle: torch writes it with its own C++ writer
        except (pickle.PicklingError, AttributeError, TypeError) as err:
            message = _unpicklable_message(target, payload, err)
            if message is None:
                raise
            raise TypeError(message) from err
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def _unpicklable_message(target: Path, payload: Any, err: BaseException) -> str | None:
    """Why ``torch.save`` could not pickle ``payload``, naming the entry at fault (``None`` if none is)."""
    where = _find_unpicklable(payload, "")
    if where is None:
        return None
    path, value = where
    return (
        f"Cannot save the checkpoint {str(target)!r}: state{path} holds {describe(value)} (type"
        f" {type(value).__name__}), which cannot be pickled ({_first_line(err)}). Save tensors, numbers,"
        " strings, containers of them and objects with state_dict(); keep other objects out of the state."
        " The file at that path, if any, is unchanged."
    )


def _find_unpicklable(value: Any, path: str) -> tuple[str, Any] | None:
    """The first value inside ``value`` that ``pickle`` refuses, with its place, e.g. ``"['fn']"``."""
    if isinstance(value, torch.Tensor):
        return None
    if isinstance(value, dict):
        items: list[tuple[Any, Any]] = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    else:
        try:
            pickle.dumps(value)
        except Exception:
            return path, value
        return None
    for key, item in items:
        found = _find_unpicklable(item, f"{path}[{key!r}]")
        if found is not None:
            return found
    return None


def read_checkpoint(
    path: str | os.PathLike[str], *, weights_only: bool = True, mmap: bool = False, map_location: Any = None
) -> dict[str, Any]:
    """Read a checkpoint file onto the CPU (memory-mapped with ``mmap``, so memory stays bounded).

    ``map_location`` (as ``torch.load`` takes it) puts the tensors elsewhere than the CPU.

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
        location = "cpu" if map_location is None else map_location
        data = torch.load(target, map_location=location, weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError as err:
        if not weights_only or not _is_torch_archive(target):
            # Random or damaged bytes also fail the safe unpickler; loading them unsafely would
            # not help, so they are reported as damage rather than as refused objects.
            raise RuntimeError(_corrupt_message(target, err)) from err
        raise pickle.UnpicklingError(
            f"The checkpoint {str(target)!r} holds pickled objects that a safe load refuses"
            f" ({_refusal(err)}). If you trust the file, either allow those classes with"
            " torch.serialization.add_safe_globals([...]) before loading, or pass weights_only=False"
            " to fabric.load / fabric.load_raw."
        ) from err
    except Exception as err:
        raise RuntimeError(_corrupt_message(target, err)) from err
    if not isinstance(data, dict):
        raise RuntimeError(
            f"The checkpoint {str(target)!r} holds a {type(data).__name__}, not a dict."
            " fabric.load reads files written by fabric.save or torch.save(dict), and fabric.load_raw"
            " a state_dict saved with torch.save(module.state_dict())."
        )
    return data


def _missing_message(target: Path) -> str:
    leftovers = sorted(p.name for p in target.parent.glob(f"{temp_prefix(target)}*{TEMP_SUFFIX}"))
    leftovers += [p.name for p in [target.parent / f"{temp_prefix(target)}staging"] if p.is_dir()]
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
        what = f"it is not a torch.save archive ({size} bytes: cut short, damaged, or another kind of file)"
    else:
        what = f"it could not be decoded ({size} bytes)"
    return (
        f"Could not read the checkpoint {str(target)!r}: {what}. torch said: {_first_line(err)}."
        " The file is truncated or corrupted (handloom's own saves are atomic, so it was probably copied"
        " or written by another tool); load another checkpoint."
    )


def _is_torch_archive(target: Path) -> bool:
    """True for a whole ``torch.save`` file: a zip archive, or the legacy format's magic header."""
    if zipfile.is_zipfile(target):
        return True
    with open(target, "rb") as handle:
        return _LEGACY_MAGIC in handle.read(64)


def _refusal(err: BaseException) -> str:
    """What the safe unpickler refused, from torch's long message (the globals it names)."""
    text = _ANSI.sub("", str(err))
    found = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return "not allowed: " + ", ".join(dict.fromkeys(found))
    return f"torch.load(weights_only=True) said: {_first_line(err)}"


def _first_line(err: BaseException) -> str:
    """The line of torch's message that says what went wrong (not its advice)."""
    text = _ANSI.sub("", str(err))
    detail = re.search(r"WeightsUnpickler error: *\n*(.+)", text)
    if detail is not None:
        return detail.group(1).strip()
    lines = text.strip().splitlines()
    line = lines[0].strip() if lines else ""
    return f"{type(err).__name__}: {line}" if line else type(err).__name__
