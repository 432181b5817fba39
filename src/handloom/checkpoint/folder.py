"""A directory of numbered checkpoints: name the next one, find the newest complete one, keep the last K.

Example::

    folder = CheckpointFolder("checkpoints", keep_last=3)
    if (latest := folder.latest()) is not None:
        fabric.load(latest, state)
    ...
    fabric.save(folder.path(step), state)
    if fabric.is_global_zero:
        folder.prune()
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from pathlib import Path

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
        if not prefix or "/" in prefix or os.sep in prefix or prefix.startswith("."):
            raise ValueError(
                f"CheckpointFolder(prefix={prefix!r}) must be a non-empty file-name start without path"
                " separators or a leading dot, for example 'step-'."
            )
        self.root = Path(root)
        self.keep_last = keep_last
        self.prefix = prefix
        self.suffix = suffix
        self._pattern = re.compile(rf"^{re.escape(prefix)}(\d+){re.escape(suffix)}$")

    def path(self, step: int) -> Path:
        """Where the checkpoint of ``step`` goes (zero-padded, so names sort by step)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"CheckpointFolder.path(step={step!r}) needs an int >= 0.")
        return self.root / f"{self.prefix}{step:09d}{self.suffix}"

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints, oldest step first. Interrupted saves are left out."""
        if not self.root.is_dir():
            return []
        found: list[tuple[int, Path]] = []
        for entry in self.root.iterdir():
            match = self._pattern.match(entry.name)
            if match is not None and is_complete(entry):
                found.append((int(match.group(1)), entry))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or ``None`` when there is none."""
        complete = self.checkpoints()
        return complete[-1] if complete else None

    def prune(self) -> list[Path]:
        """Delete all but the newest ``keep_last`` complete checkpoints, and leftovers of interrupted saves.

        A checkpoint being written in the background by this process is neither counted nor touched.
        Call it from one process (global rank 0). Returns what was deleted.
        """
        removed: list[Path] = []
        complete = self.checkpoints()
        if self.keep_last is not None:
            for path in complete[: max(0, len(complete) - self.keep_last)]:
                _remove(path)
                removed.append(path)
        busy = background.in_flight()
        for entry in self._leftovers():
            if busy is not None and entry.name.startswith(f".{Path(busy).name}."):
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


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
