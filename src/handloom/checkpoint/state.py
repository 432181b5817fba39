"""Turning a user's ``state`` into plain state dicts for a checkpoint, and restoring it in place."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from handloom.checkpoint.resume import combine
from handloom.validation import describe
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


def restore_state(state: dict[str, Any], checkpoint: dict[str, Any], strict: bool) -> dict[str, Any]:
    """Load ``checkpoint`` into the objects of ``state`` in place; return the keys ``state`` did not ask for.

    Raises:
        KeyError: ``strict`` and a key of ``state`` is missing from the checkpoint.
    """
    missing = [key for key in state if key not in checkpoint]
    if strict and missing:
        if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
            held = ", ".join(repr(key) for key in sorted(checkpoint)[:3])
            raise KeyError(
                f"The checkpoint has no entry {missing[0]!r}: it is a plain state_dict (it holds {held}"
                f"{', ...' if len(checkpoint) > 3 else ''}), not the dict of objects fabric.save writes."
                " Load it into the model with fabric.load_raw(path, model)."
            )
        raise KeyError(
            f"The checkpoint has no entry {missing[0]!r} (it holds {sorted(checkpoint)})."
            " Remove the key from the state you load, or pass strict=False."
        )
    for key, value in list(state.items()):
        if key not in checkpoint:
            continue
        obj = unwrap(value)
        if isinstance(obj, torch.nn.Module):
            try:
                obj.load_state_dict(checkpoint[key], strict=strict)
            except RuntimeError as err:
                raise RuntimeError(
                    f"The checkpoint's entry {key!r} does not fit the {type(obj).__name__} under {key!r}"
                    f" in the state: {str(err).strip()}\nIt was saved from a model of another"
                    " architecture or size. Load it into a model built like the one that saved it;"
                    " strict=False skips missing and unexpected keys, but the sizes must match."
                ) from err
        elif _has_state(obj):
            obj.load_state_dict(checkpoint[key])
        else:
            state[key] = checkpoint[key]
    return {key: value for key, value in checkpoint.items() if key not in state}


@dataclass(frozen=True)
class SaveRequest:
    """One ``fabric.save`` call, as the strategy receives it.

    Attributes:
        path: Where the checkpoint goes.
        state: The user's state (wrapped or plain modules, optimizers, other objects, values).
        filter: Per-key ``(name, value) -> bool`` selections, or ``None``.
        modules: The modules set up with this Fabric (to find an optimizer's model).
        rank_entries: This rank's entries of the per-rank values in ``state`` (set-up loaders,
            ``RandomState``), by key; see :mod:`handloom.checkpoint.resume`.
        async_save: Return once the state is in host memory and write in the background.
        given_path: The path as the user wrote it, for a CheckpointIO plugin (``"s3://..."`` does
            not survive :class:`~pathlib.Path`); ``None``: ``path``.
    """

    path: Path
    state: Mapping[str, Any]
    filter: Mapping[str, Callable[[str, Any], bool]] | None
    modules: list[torch.nn.Module]
    rank_entries: dict[str, Any]
    async_save: bool
    given_path: str | os.PathLike[str] | None = None

    def with_ranks(self, gathered: Sequence[Mapping[str, Any]]) -> SaveRequest:
        """This request with each per-rank value replaced by every rank's entries (``gathered[rank]``)."""
        if not self.rank_entries:
            return self
        values = combine(gathered)
        return replace(self, state={key: values.get(key, value) for key, value in self.state.items()})


def check_path(path: object, method: str) -> None:
    """Reject a checkpoint ``path`` that is not a ``str`` or ``os.PathLike`` (``TypeError``)."""
    if isinstance(path, (str, os.PathLike)):
        return
    raise TypeError(
        f"fabric.{method}(path={describe(path)}) needs a file path (a str or os.PathLike), got type"
        f" {type(path).__name__}. Pass where the checkpoint is, for example"
        f" fabric.{method}('checkpoints/step-100.ckpt', state)."
    )


def check_load_state(state: object) -> None:
    """Reject a ``fabric.load`` state that is neither ``None`` nor a dict (``TypeError``)."""
    if state is None or isinstance(state, dict):
        return
    raise TypeError(
        f"fabric.load(path, state) needs a dict for state (or None to return the whole checkpoint),"
        f" got type {type(state).__name__}. Put the objects to restore in a dict under the keys they"
        ' were saved with, for example {"model": model, "optimizer": optimizer}.'
    )


def check_user_state(state: object) -> None:
    """Reject a ``state`` that is not a dict (``TypeError``)."""
    if not isinstance(state, dict):
        raise TypeError(
            f"fabric.save(path, state) needs a dict for state, got {type(state).__name__}."
            ' Put the objects to save in a dict, for example {"model": model, "optimizer": optimizer}.'
        )
