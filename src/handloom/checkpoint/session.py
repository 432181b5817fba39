"""Fabric's side of checkpointing: which dataloaders exist, what a resume restores, waiting at exit.

``Fabric.save``/``load`` delegate here; the strategy decides the format and who writes.
"""

from __future__ import annotations

import atexit
import os
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from handloom.checkpoint import background, resume
from handloom.checkpoint.state import SaveRequest, check_load_state, check_path, check_user_state

if TYPE_CHECKING:
    from handloom.strategies.base import Strategy
    from handloom.wrappers import _FabricDataLoader


class CheckpointSession:
    """Tracks the set-up dataloaders in setup order and applies resume state to them.

    Args:
        strategy: The Fabric's strategy (writes and reads checkpoints).
        on_failed_exit: Called before the process exits with status 1 because a background save
            failed (Fabric finalises its loggers there).
    """

    def __init__(self, strategy: Strategy, on_failed_exit: Callable[[], None]) -> None:
        self._strategy = strategy
        self._loaders: list[weakref.ref[_FabricDataLoader]] = []
        self._pending: list[Any] = []
        self._on_failed_exit = on_failed_exit
        self._exit_hook = False

    def add_loader(self, loader: _FabricDataLoader) -> None:
        """Register a newly set-up loader; apply progress a loaded checkpoint holds for its slot."""
        index = len(self._loaders)
        self._loaders.append(weakref.ref(loader))
        if index < len(self._pending) and self._pending[index] is not None:
            progress, saved_world = self._pending[index]
            self._pending[index] = None
            world_size = self._strategy.world_size
            loader.restore_progress(progress, saved_world_size=saved_world, world_size=world_size)

    def _live_loaders(self) -> list[_FabricDataLoader | None]:
        return [ref() for ref in self._loaders]

    def save(
        self,
        path: str | os.PathLike[str],
        state: dict[str, Any],
        filter: Any,
        modules: list[torch.nn.Module],
        *,
        resume_state: bool,
        async_save: bool,
    ) -> None:
        """Build the request for ``fabric.save`` and hand it to the strategy."""
        check_path(path, "save")
        check_user_state(state, resume.RESUME_KEY)
        entry = resume.rank_entry(self._live_loaders()) if resume_state else None
        request = SaveRequest(Path(path), state, filter, modules, entry, async_save)
        if async_save:
            self._install_exit_hook()
        self._strategy.save_checkpoint(request)

    def load(
        self,
        path: str | os.PathLike[str],
        state: dict[str, Any] | None,
        strict: bool,
        modules: list[torch.nn.Module],
        *,
        resume_state: bool,
        weights_only: bool,
    ) -> Any:
        """Restore ``state`` (and, with ``resume_state``, random states, loaders, scaler); return the rest."""
        check_path(path, "load")
        check_load_state(state)
        background.wait()  # the checkpoint being loaded may be the one still being written
        strategy = self._strategy
        remainder = strategy.load_checkpoint(path, state, strict, modules, weights_only)
        if state is None:
            return remainder
        saved = remainder.pop(resume.RESUME_KEY, None)
        if resume_state and isinstance(saved, dict) and saved.get("ranks"):
            pending = resume.restore(
                saved,
                rank=strategy.global_rank,
                world_size=strategy.world_size,
                loaders=self._live_loaders(),
                scaler=strategy.amp.scaler,
            )
            saved_world = int(saved["meta"]["world_size"])
            self._pending = [None if p is None else (p, saved_world) for p in pending]
        return remainder

    def wait(self) -> None:
        """Finish the background save in flight (launched workers call this before returning)."""
        background.wait()

    def _install_exit_hook(self) -> None:
        if not self._exit_hook:
            atexit.register(self.wait_at_exit)
            self._exit_hook = True

    def wait_at_exit(self) -> None:
        """Finish the background save in flight; if it failed, say so and end the process with status 1."""
        try:
            background.wait()
        except background.CheckpointSaveError as err:
            print(f"handloom: {err}", file=sys.stderr, flush=True)
            self._on_failed_exit()
            sys.stdout.flush()
            os._exit(1)  # an exit hook cannot change the exit status any other way
