"""A directory of numbered checkpoints: name the next one, find the newest complete one, keep the last K.

Example::

    folder = CheckpointFolder("checkpoints", keep_last=3)
    state = {"model": model, "optimizer": optimizer, "loader": loader, "rng": RandomState(), "step": 0}
    folder.resume(fabric, state)  # the newest complete checkpoint, if any
    ...
    fabric.save(folder.path(step), state)  # on every rank
    if fabric.is_global_zero:
        folder.prune()
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

from handloom.checkpoint import background, staging
from handloom.checkpoint.io import TEMP_SUFFIX


class CheckpointFolder:
    """Checkpoints named ``<prefix><step><suffix>`` in ``root``, files or sharded directories alike.

    Args:
        root: The directory; created by the first save.
        keep_last: How many complete checkpoints :meth:`prune` keeps (``None``: all of them).
        prefix: The start of every checkpoint's name.
        suffix: The end of every checkpoint's name.

    Raises:
        ValueError: ``keep_last`` is not a positive int, or ``prefix`` is empty or holds a separator.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        keep_last: int | None = 3,
        prefix: str = "step-",
        suffix: str = ".ckpt",
    ) -> None:
        bad_count = isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
        if keep_last is not None and bad_count:
            raise ValueError(
                f"CheckpointFolder(keep_last={keep_last!r}) must be an int >= 1 (how many checkpoints to"
                " keep), or None to keep all."
            )
        if not isinstance(prefix, str) or not prefix or _has_separator(prefix) or prefix.startswith("."):
            raise ValueError(
                f"CheckpointFolder(prefix={prefix!r}) must be a non-empty file-name start without path"
                " separators or a leading dot, for example 'step-'."
            )
        if not isinstance(suffix, str) or _has_separator(suffix):
            raise ValueError(
                f"CheckpointFolder(suffix={suffix!r}) must be a file-name end without path separators,"
                " for example '.ckpt', or '' for none."
            )
        self.root = Path(root)
        self.keep_last = keep_last
        self.prefix = prefix
        self.suffix = suffix
        self._pattern = re.compile(rf"^{re.escape(prefix)}(\d+){re.escape(suffix)}$")

    def path(self, step: int) -> Path:
        """Where the checkpoint of ``step`` goes (zero-padded, so names sort by step)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(
                f"CheckpointFolder.path(step={step!r}) needs an int >= 0: the training step the checkpoint"
                " is for, for example folder.path(state['step'])."
            )
        return self.root / f"{self.prefix}{step:09d}{self.suffix}"

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints, oldest step first. Interrupted saves are left out.

        A sharded checkpoint whose commit a crash interrupted between its two renames is listed
        under its own name: ``fabric.load`` reads it there (see :mod:`handloom.checkpoint.staging`).
        """
        if not self.root.is_dir():
            return []
        found: dict[Path, int] = {}
        for entry in self.root.iterdir():
            match = self._pattern.match(entry.name)
            if match is not None and is_complete(entry):
                found[entry] = int(match.group(1))
                continue
            target = self._mid_commit_target(entry)
            if target is not None:
                match = self._pattern.match(target.name)
                assert match is not None  # _mid_commit_target only returns names of this folder
                found[target] = int(match.group(1))
        return [path for path, _ in sorted(found.items(), key=lambda item: (item[1], item[0].name))]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or ``None`` when there is none."""
        complete = self.checkpoints()
        return complete[-1] if complete else None

    def resume(self, fabric: Any, state: dict[str, Any]) -> Path | None:
        """Load the newest complete checkpoint into ``state`` if there is one; return its path.

        The one line that makes a script resume after a crash, a preemption or an elastic restart
        (``handloom run --max-restarts N``): every rank loads the checkpoint global rank 0 found,
        so ranks never resume from different steps. Call it on every rank after ``fabric.setup``.
        It restores what ``state`` holds, as ``fabric.load`` does: with the set-up dataloader and
        a :class:`~handloom.checkpoint.RandomState` in it, the run continues mid-epoch exactly.

        Example::

            state = {"model": model, "optimizer": optimizer, "loader": loader, "rng": RandomState()}
            state["step"] = 0
            CheckpointFolder("checkpoints").resume(fabric, state)  # state["step"] is the saved one
        """
        latest: Path | None = fabric.broadcast(self.latest())
        if latest is not None:
            fabric.load(latest, state)
        return latest

    def prune(self) -> list[Path]:
        """Delete all but the newest ``keep_last`` complete checkpoints, and leftovers of interrupted saves.

        A checkpoint being written in the background by this process is neither counted nor touched.
        Call it from one process (global rank 0). Returns what was deleted.
        """
        busy = background.in_flight()
        busy_path = None if busy is None else Path(busy)
        if busy_path is not None and busy_path.parent.resolve() != self.root.resolve():
            busy_path = None  # written elsewhere

        def in_flight(entry: Path) -> bool:
            if busy_path is None:
                return False
            return entry.name == busy_path.name or entry.name.startswith(f".{busy_path.name}.")

        # A commit a crash interrupted is finished first, so its checkpoint is counted and kept.
        for entry in self._leftovers():
            target = self._mid_commit_target(entry)
            if target is not None and not in_flight(entry):
                staging.recover(target)
        removed: list[Path] = []
        complete = [path for path in self.checkpoints() if not in_flight(path)]
        if self.keep_last is not None:
            for path in complete[: max(0, len(complete) - self.keep_last)]:
                _remove(path)
                removed.append(path)
        for entry in self._leftovers():
            if in_flight(entry) or self._mid_commit_target(entry) is not None:
                continue
            _remove(entry)
            removed.append(entry)
        return removed

    def _leftovers(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        leftovers = []
        for entry in self.root.iterdir():
            name = entry.name
            if not name.startswith("."):
                continue
            for ending in (TEMP_SUFFIX, staging.STAGING_SUFFIX, staging.OLD_SUFFIX):
                if name.endswith(ending) and self._owns_hidden(name, ending):
                    leftovers.append(entry)
                    break
        return leftovers

    def _owns_hidden(self, name: str, ending: str) -> bool:
        inner = name[1 : -len(ending)]
        if ending == TEMP_SUFFIX:
            inner = inner.rsplit(".", 1)[0]  # ".<name>.<random>.tmp"
        return self._pattern.match(inner) is not None

    def _mid_commit_target(self, entry: Path) -> Path | None:
        """The checkpoint ``entry`` stands in for, when it is the complete copy a crash mid-commit left."""
        for ending in (staging.STAGING_SUFFIX, staging.OLD_SUFFIX):
            if entry.name.startswith(".") and entry.name.endswith(ending):
                target = entry.parent / entry.name[1 : -len(ending)]
                if self._pattern.match(target.name) is None or target.exists():
                    return None
                return target if staging.readable(target) == entry else None
        return None


def is_complete(path: Path) -> bool:
    """True for a committed sharded directory or a whole ``torch.save`` file (its zip index is intact)."""
    if path.is_dir():
        return staging.is_complete(path)
    return path.is_file() and zipfile.is_zipfile(path)


def latest_checkpoint(
    root: str | os.PathLike[str], prefix: str = "step-", suffix: str = ".ckpt"
) -> Path | None:
    """The newest complete checkpoint in ``root`` named as :class:`CheckpointFolder` names them."""
    return CheckpointFolder(root, keep_last=None, prefix=prefix, suffix=suffix).latest()


def _has_separator(name: str) -> bool:
    return "/" in name or os.sep in name or (os.altsep is not None and os.altsep in name)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
