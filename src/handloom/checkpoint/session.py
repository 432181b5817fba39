"""Fabric's side of checkpointing: the per-rank values of a state, what a load restores, waiting at exit.

``Fabric.save``/``load`` delegate here; the strategy decides the format and who writes. Set-up
dataloaders and :class:`~handloom.checkpoint.resume.RandomState` values are handled here, so the
strategies see only plain entries: on save, this rank's entry of each (gathered across ranks by
the strategy); on load, a placeholder that the checkpoint's value replaces, restored afterwards.
"""

from __future__ import annotations

import atexit
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from handloom.checkpoint import background, resume
from handloom.checkpoint.state import SaveRequest, check_load_state, check_path, check_user_state

if TYPE_CHECKING:
    from handloom.strategies.base import Strategy


class _Placeholder:
    """Stands in for a per-rank value during a load, so the strategy treats it as a plain value."""

    def __repr__(self) -> str:
        return "<restored by fabric.load>"


class CheckpointSession:
    """Saves and loads a Fabric's checkpoints through its strategy; waits for background saves at exit.

    Args:
        strategy: The Fabric's strategy (writes and reads checkpoints).
        on_failed_exit: Called before the process exits with status 1 because a background save
            failed (Fabric finalises its loggers there).
    """

    def __init__(self, strategy: Strategy, on_failed_exit: Callable[[], None]) -> None:
        self._strategy = strategy
        self._on_failed_exit = on_failed_exit
        self._exit_hook = False

    def save(
        self,
        path: str | os.PathLike[str],
        state: dict[str, Any],
        filter: Any,
        modules: list[torch.nn.Module],
        *,
        resume_state: bool | None,
        async_save: bool,
    ) -> None:
        """Build the request for ``fabric.save`` and hand it to the strategy."""
        check_path(path, "save")
        check_user_state(state)
        _warn_resume_state(resume_state, "save")
        request = SaveRequest(
            Path(path), state, filter, modules, resume.local_entries(state), async_save, given_path=path
        )
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
        resume_state: bool | None,
        weights_only: bool,
    ) -> Any:
        """Restore ``state`` in place (loaders and ``RandomState`` values too); return the rest."""
        check_path(path, "load")
        check_load_state(state)
        _warn_resume_state(resume_state, "load")
        background.wait()  # the checkpoint being loaded may be the one still being written
        strategy = self._strategy
        if state is None:
            whole = strategy.load_checkpoint(path, None, strict, modules, weights_only)
            return resume.drop_legacy(whole, None)
        values = {key: value for key, value in state.items() if resume.is_resume_value(value)}
        inner = {key: _Placeholder() if key in values else value for key, value in state.items()}
        remainder = strategy.load_checkpoint(path, inner, strict, modules, weights_only)
        for key in state:
            if key not in values:
                state[key] = inner[key]  # plain values were written into the copy
        saved = {key: inner[key] for key in values if not isinstance(inner[key], _Placeholder)}
        if resume_state is not False:
            rank, world_size = strategy.global_rank, strategy.world_size
            resume.restore(values, saved, rank=rank, world_size=world_size, path=path)
        return resume.drop_legacy(remainder, state)

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


def _warn_resume_state(resume_state: bool | None, method: str) -> None:
    if resume_state is None:
        return
    effect = (
        "resume_state=False skips restoring the set-up dataloaders and RandomState values in state"
        if method == "load"
        else "it has no effect on a save"
    )
    warnings.warn(
        f"fabric.{method}(..., resume_state={resume_state!r}) is deprecated: a checkpoint holds the"
        f" dataloader positions and random states only where state has a set-up dataloader or a"
        f" handloom.checkpoint.RandomState(), and a load restores only those ({effect}). Leave them"
        " out of state instead, and drop the argument.",
        DeprecationWarning,
        stacklevel=4,  # the user's fabric.save / fabric.load call
    )
