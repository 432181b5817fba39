"""Committing a checkpoint directory so that a crash never leaves a half-written one in its place.

Every rank writes into ``.<name>.staging`` beside the target. When all shards and ``meta.pt`` are
on disk, rank 0 writes the completion marker :data:`MARKER` (JSON metadata) into the staging
directory and commits:

1. the previous checkpoint at the target, if any, is renamed to ``.<name>.old``;
2. the staging directory is renamed to the target;
3. ``.<name>.old`` is deleted.

Only a directory that holds the marker is a checkpoint. A crash before step 1 leaves the previous
checkpoint untouched; a crash between steps 1 and 2 leaves both a complete staging directory and
``.old``: loads then read the complete staging directory (:func:`readable`), and the next save of
that path finishes the commit first (:func:`recover`). Nothing is deleted before its replacement
is committed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from handloom.checkpoint.io import fsync_directory

MARKER = "handloom.json"
STAGING_SUFFIX = ".staging"
OLD_SUFFIX = ".old"


def staging_path(target: Path) -> Path:
    """Where the ranks write before the commit."""
    return target.parent / f".{target.name}{STAGING_SUFFIX}"


def old_path(target: Path) -> Path:
    """Where the replaced checkpoint waits until the new one is in place."""
    return target.parent / f".{target.name}{OLD_SUFFIX}"


def is_complete(path: Path) -> bool:
    """True when ``path`` is a committed checkpoint directory."""
    return (path / MARKER).is_file()


def read_marker(path: Path) -> dict[str, Any]:
    """The metadata a committed checkpoint directory carries."""
    with open(path / MARKER, encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


def prepare(target: Path) -> Path:
    """Make an empty staging directory for ``target`` (rank 0, before any rank writes).

    Raises:
        FileExistsError: A file, or a directory that is not a checkpoint, is at ``target``; the
            commit would replace it, so it is left alone.
    """
    if target.is_file():
        raise FileExistsError(
            f"fabric.save({str(target)!r}) writes a sharded checkpoint, which is a directory, but a file"
            " exists at that path. Choose another path or remove the file."
        )
    if target.is_dir() and not _replaceable(target):
        raise FileExistsError(
            f"fabric.save({str(target)!r}) writes a sharded checkpoint, which replaces what is at that path,"
            f" but {str(target)!r} is a directory that is not a checkpoint (no {MARKER}, no .metadata)"
            " and not empty. Choose another path, or remove the directory."
        )
    recover(target)
    staging = staging_path(target)
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted save; the committed checkpoint is elsewhere
    staging.mkdir(parents=True)
    return staging


def _replaceable(path: Path) -> bool:
    """A directory a save may replace: a checkpoint (committed, or DCP's without a marker) or empty."""
    return is_complete(path) or (path / ".metadata").is_file() or not any(path.iterdir())


def commit(target: Path, metadata: dict[str, Any]) -> None:
    """Mark the staging directory complete and move it to ``target`` (rank 0, after all ranks wrote)."""
    staging = staging_path(target)
    marker = staging / MARKER
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump(metadata, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_directory(staging)
    old = old_path(target)
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    fsync_directory(target.parent)
    if old.exists():
        shutil.rmtree(old)


def recover(target: Path) -> None:
    """Finish a commit that a crash interrupted between its two renames (see the module doc)."""
    if target.exists():
        return
    staging, old = staging_path(target), old_path(target)
    if staging.is_dir() and is_complete(staging):
        os.replace(staging, target)
    elif old.is_dir() and is_complete(old):
        os.replace(old, target)
    else:
        return
    fsync_directory(target.parent)


def readable(target: Path) -> Path:
    """The directory to read for ``target``: itself, or the complete one a crash left mid-commit."""
    if target.exists():
        return target
    for candidate in (staging_path(target), old_path(target)):
        if candidate.is_dir() and is_complete(candidate):
            return candidate
    return target


def incomplete_message(path: Path) -> str:
    """Why ``path`` cannot be loaded as a sharded checkpoint."""
    if path.name.endswith(STAGING_SUFFIX):
        return (
            f"{str(path)!r} is the staging directory of a sharded save that did not finish, not a"
            " checkpoint. Load the committed checkpoint beside it (the same name without the leading"
            f" dot and {STAGING_SUFFIX!r}), or an earlier one."
        )
    return (
        f"{str(path)!r} is a directory without {MARKER}, so it is not a complete handloom sharded"
        " checkpoint (a save into it was interrupted, or another tool wrote it). Load another checkpoint."
    )


def damaged_files(path: Path) -> list[str]:
    """The files of the sharded checkpoint ``path`` that are missing or shorter than its index says.

    Each entry is a file name with what is wrong with it, e.g. ``"__1_0.distcp (812 of 4795 bytes)"``.
    """
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    if not (path / ".metadata").is_file():
        return [".metadata (missing)"]
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
        needed: dict[str, int] = {}
        for info in metadata.storage_data.values():
            end = int(info.offset) + int(info.length)
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    except Exception:
        return [".metadata (unreadable)"]
    damaged = []
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            damaged.append(f"{name} (missing)")
        elif file.stat().st_size < size:
            damaged.append(f"{name} ({file.stat().st_size} of {size} bytes)")
    return damaged


def unreadable_message(path: Path, err: BaseException) -> str:
    """Why reading the shards of the committed checkpoint ``path`` failed with ``err``.

    Names the shard files that are missing or shorter than the checkpoint's index says, when some
    are; otherwise the shards did not fit what was asked of them (another model's checkpoint).
    """
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    said = lines[-1] if lines else type(err).__name__  # DCP puts the cause at the end of a traceback
    said = said.split(". ")[0].rstrip(".")  # the error, not torch's advice after it
    damaged = damaged_files(path)
    if damaged:
        return (
            f"Could not read the sharded checkpoint {str(path)!r}: {', '.join(damaged)}"
            f" {'is' if len(damaged) == 1 else 'are'} missing or truncated (torch said: {said})."
            " The checkpoint was damaged after it was written (handloom commits a sharded checkpoint"
            " only once every shard is on disk); load another checkpoint."
        )
    return (
        f"Could not read the sharded checkpoint {str(path)!r} into the given state (torch said: {said})."
        " Its files are all there, so it probably holds another model's or optimizer's state, or a"
        " file is damaged inside; check that the state matches the one saved, or load another checkpoint."
    )
