"""Checkpoint files through ``torch.save``/``torch.load``, crash-safe (Lightning's ``TorchCheckpointIO``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from typing_extensions import override

from handloom.plugins.io.checkpoint_io import CheckpointIO

__all__ = ["TorchCheckpointIO"]


class TorchCheckpointIO(CheckpointIO):
    """The default :class:`CheckpointIO`: handloom's own checkpoint files.

    A save writes a temporary file beside the target, fsyncs it and renames it over the target,
    so a crash never leaves a half-written checkpoint (:func:`handloom.checkpoint.write_atomic`).
    A load reads onto the CPU and names the file in its errors
    (:func:`handloom.checkpoint.read_checkpoint`).
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` at ``path`` atomically, creating the parent directories.

        Args:
            checkpoint: The state to write.
            path: Where to write it.
            storage_options: Must be ``None``: local files take no options.

        Raises:
            TypeError: ``storage_options`` was given.
        """
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint(..., storage_options={storage_options!r}) got"
                " storage options, but it writes local files, which take none. Leave storage_options"
                " out, or pass a CheckpointIO subclass of your own that uses them."
            )
        from handloom.checkpoint.io import write_atomic

        write_atomic(path, checkpoint)

    @override
    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read the checkpoint file at ``path``.

        Args:
            path: Where the checkpoint is.
            map_location: Where to put the tensors, as ``torch.load`` takes it (default: the CPU).
            weights_only: Refuse arbitrary pickled objects; ``None`` means ``True``, as in torch.

        Returns:
            The checkpoint.

        Raises:
            FileNotFoundError: No file at ``path``.
            RuntimeError: The file is truncated, corrupted or not a checkpoint.
        """
        from handloom.checkpoint.io import read_checkpoint

        return read_checkpoint(
            path, weights_only=True if weights_only is None else weights_only, map_location=map_location
        )

    @override
    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Delete the file or directory at ``path``; nothing happens when there is none.

        Args:
            path: Where the checkpoint is.
        """
        target = Path(path)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
