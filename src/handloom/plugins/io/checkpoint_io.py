"""The interface through which single-file checkpoints are written and read (Lightning's ``CheckpointIO``)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

__all__ = ["CheckpointIO"]


class CheckpointIO(ABC):
    """Writes, reads and removes checkpoint files for the single-device, DDP and DP strategies.

    ``fabric.save`` turns the state into plain state dicts and passes them, on global rank 0, to
    :meth:`save_checkpoint`; ``fabric.load`` and ``fabric.load_raw`` read files through
    :meth:`load_checkpoint`. Subclass it to store checkpoints elsewhere and pass an instance in
    ``Fabric(plugins=[...])``. Sharded strategies (FSDP, model parallel) write their own
    directories and refuse a plugin.

    Example::

        class S3CheckpointIO(CheckpointIO):
            def save_checkpoint(self, checkpoint, path, storage_options=None): ...
            def load_checkpoint(self, path, map_location=None, weights_only=None): ...
            def remove_checkpoint(self, path): ...

        fabric = Fabric(plugins=[S3CheckpointIO()])
    """

    @abstractmethod
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` at ``path``.

        Args:
            checkpoint: The state to write: plain state dicts and values.
            path: Where to write it.
            storage_options: Options for the storage, for plugins that take any.
        """

    @abstractmethod
    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read the checkpoint at ``path``.

        Args:
            path: Where the checkpoint is.
            map_location: Where to put the tensors, as ``torch.load`` takes it.
            weights_only: Refuse arbitrary pickled objects (``torch.load(weights_only=True)``).

        Returns:
            The checkpoint.
        """

    @abstractmethod
    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Delete the checkpoint at ``path``.

        Args:
            path: Where the checkpoint is.
        """

    def teardown(self) -> None:  # noqa: B027  (an optional hook, as in Lightning)
        """Release what the plugin holds (nothing here)."""
