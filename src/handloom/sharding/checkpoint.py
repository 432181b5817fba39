"""Checkpoints of sharded models with ``torch.distributed.checkpoint`` (DCP).

Two formats:

* **sharded** (a directory): every rank writes its shards of model and optimizer tensors with
  ``torch.distributed.checkpoint.save``; rank 0 adds ``meta.pt`` with everything else the state
  holds (plain values, LR schedulers, ...) and the marker ``handloom.json``, which describes the
  checkpoint (versions, world size, strategy, precision, time). DCP reshards on
  load, so a checkpoint written by N processes loads on M, or in one process without any
  process group.
* **full** (one file): the full model and optimizer state, gathered to rank 0 and written as one
  ``torch.save`` file that ``torch.load`` reads into a plain module and ``optimizer.load_state_dict``
  into a plain optimizer.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from handloom import checkpoint as single_file
from handloom.checkpoint import staging
from handloom.sharding import optim as optim_keys
from handloom.wrappers import unwrap

if TYPE_CHECKING:
    from handloom.checkpoint.state import SaveRequest

META_FILE = "meta.pt"
FORMAT_VERSION = 2

Filter = Mapping[str, Callable[[str, Any], bool]] | None


def _split(
    state: Mapping[str, Any],
) -> tuple[dict[str, torch.nn.Module], dict[str, torch.optim.Optimizer], dict[str, Any]]:
    modules: dict[str, torch.nn.Module] = {}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    rest: dict[str, Any] = {}
    for key, value in state.items():
        obj = unwrap(value)
        if isinstance(obj, torch.nn.Module):
            modules[key] = obj
        elif isinstance(obj, torch.optim.Optimizer):
            optimizers[key] = obj
        else:
            rest[key] = value
    return modules, optimizers, rest


def owner_of(
    optimizer: torch.optim.Optimizer, key: str, candidates: list[torch.nn.Module]
) -> torch.nn.Module:
    """The model whose parameters ``optimizer`` updates.

    Raises:
        ValueError: None of ``candidates`` holds the optimizer's parameters.
    """
    params = optim_keys.optimizer_parameters(optimizer)
    if not params:
        raise ValueError(f"The optimizer under {key!r} has no parameters, so there is nothing to save.")
    wanted = id(params[0])
    for module in candidates:
        if any(id(p) == wanted for p in module.parameters()):
            return module
    raise ValueError(
        f"The optimizer under {key!r} updates parameters of a model that was not set up with this Fabric."
        " Set the model up with fabric.setup_module(model) and build the optimizer from its parameters."
    )


def _only(filter: Filter, keys: Mapping[str, Any]) -> Filter:
    """The part of ``filter`` that applies to ``keys`` (the whole filter was checked already)."""
    if filter is None:
        return None
    return {key: fn for key, fn in filter.items() if key in keys}


def _tensor_state(
    state: Mapping[str, Any], filter: Filter, candidates: list[torch.nn.Module], options: Any = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model and optimizer state dicts, everything else)`` for this rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    modules, optimizers, rest = _split(state)
    tensors: dict[str, Any] = {}
    for key, module in modules.items():
        tensors[key] = single_file.apply_filter(key, get_model_state_dict(module, options=options), filter)
    for key, optimizer in optimizers.items():
        owner = owner_of(optimizer, key, [*modules.values(), *candidates])
        full = get_optimizer_state_dict(owner, optimizer, options=options)
        if options is not None and getattr(options, "full_state_dict", False):
            if not full:  # only rank 0 receives a gathered full state
                continue
            full = optim_keys.to_position_keyed(full, optimizer, owner)
        tensors[key] = single_file.apply_filter(key, full, filter)
    return tensors, rest


def save_sharded(request: SaveRequest, group: Any, description: dict[str, Any]) -> None:
    """Write a DCP directory at ``request.path``: staged, then committed (see :mod:`.staging`).

    Every rank calls this after the ranks agreed on the save and rank 0 prepared the staging
    directory. ``request`` holds every rank's per-rank entries; ``description`` (versions, world
    size, ...) goes into the marker, not into the user's state.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict_saver import async_save, save

    from handloom.checkpoint import background

    target = Path(request.path)
    tensors, rest = _tensor_state(request.state, request.filter, request.modules)
    rank = dist.get_rank() if dist.is_initialized() else 0
    meta: dict[str, Any] = {}
    if rank == 0:
        meta = {
            "handloom": {"format": FORMAT_VERSION, "tensor_keys": sorted(tensors)},
            "state": single_file.collect_state(rest, _only(request.filter, rest)),
        }
    marker = {**description, "format": FORMAT_VERSION}
    folder = staging.staging_path(target)

    def finish() -> None:
        if rank == 0:
            single_file.write_atomic(folder / META_FILE, meta)
            staging.commit(target, marker)

    if not request.async_save:
        save(tensors, checkpoint_id=folder, process_group=group)
        finish()
        if dist.is_initialized():
            dist.barrier(group=group)
        return
    meta = background.host_copy(meta)
    response = async_save(tensors, checkpoint_id=folder, process_group=group)
    future: Any = getattr(response, "upload_completion", response)  # a Future, or in AsyncSaveResponse

    def complete() -> None:
        future.result()  # on rank 0 this returns once every rank's shards and the index are written
        finish()

    background.submit(str(target), complete)


def save_full(request: SaveRequest, share: Callable[[str | None], str | None]) -> None:
    """Gather the full state to rank 0 and write it as one ``torch.save`` file. Every rank calls this.

    ``share`` hands rank 0's outcome to every rank (see :func:`handloom.checkpoint.background.write_shared`).
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from handloom.checkpoint import background

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    tensors, rest = _tensor_state(request.state, request.filter, request.modules, options)
    rank = dist.get_rank() if dist.is_initialized() else 0

    def build() -> dict[str, Any]:
        collected = {**tensors, **single_file.collect_state(rest, _only(request.filter, rest))}
        return {key: collected[key] for key in request.state if key in collected}

    background.write_shared(Path(request.path), build if rank == 0 else None, request.async_save, share)


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is (or, after an interrupted commit, stands for) a sharded checkpoint directory."""
    return staging.readable(Path(path)).is_dir()


def _read_meta(path: Path, weights_only: bool = True) -> dict[str, Any]:
    if not staging.is_complete(path):
        raise FileNotFoundError(staging.incomplete_message(path))
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(
            f"The sharded checkpoint {str(path)!r} has its {staging.MARKER} but no {META_FILE}, so it was"
            " damaged after it was written (handloom commits a sharded checkpoint only once every file"
            " is on disk). Load an earlier checkpoint."
        )
    return single_file.read_checkpoint(path / META_FILE, weights_only=weights_only)


def _check_keys(state: Mapping[str, Any], available: set[str], path: Path, strict: bool) -> None:
    missing = [key for key in state if key not in available]
    if strict and missing:
        raise KeyError(
            f"The checkpoint {str(path)!r} has no entry {missing[0]!r} (it holds {sorted(available)})."
            " Remove the key from the state you load, or pass strict=False."
        )


def load_sharded(
    path: str | os.PathLike[str],
    state: dict[str, Any],
    strict: bool,
    *,
    candidates: list[torch.nn.Module],
    weights_only: bool = True,
) -> dict[str, Any]:
    """Load a DCP directory into the objects of ``state`` (resharding as needed); return the rest.

    Works under any strategy, and in one process without a process group.
    """
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.checkpoint.state_dict_loader import load

    target = Path(path)
    meta = _read_meta(target, weights_only)
    saved_state: dict[str, Any] = meta["state"]
    tensor_keys = set(meta["handloom"]["tensor_keys"])
    _check_keys(state, tensor_keys | set(saved_state), target, strict)
    modules, optimizers, rest = _split(state)
    wanted: dict[str, Any] = {}
    owners: dict[str, torch.nn.Module] = {}
    for key, module in modules.items():
        if key in tensor_keys:
            wanted[key] = get_model_state_dict(module)
    for key, optimizer in optimizers.items():
        if key in tensor_keys:
            owners[key] = owner_of(optimizer, key, [*modules.values(), *candidates])
            wanted[key] = get_optimizer_state_dict(owners[key], optimizer)
    if wanted:
        with warnings.catch_warnings():
            # Loading in one process without a process group is intended here, not a mistake.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            try:
                load(wanted, checkpoint_id=target, planner=DefaultLoadPlanner(allow_partial_load=not strict))
            except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException
                raise RuntimeError(staging.unreadable_message(target, err)) from err
    for key, module in modules.items():
        if key in wanted:
            set_model_state_dict(module, wanted[key], options=StateDictOptions(strict=strict))
    for key, optimizer in optimizers.items():
        if key in wanted:
            set_optimizer_state_dict(owners[key], optimizer, wanted[key])
    return _restore_rest(state, rest, saved_state, strict, exclude=set(wanted))


def _restore_rest(
    state: dict[str, Any], rest: dict[str, Any], saved: dict[str, Any], strict: bool, exclude: set[str]
) -> dict[str, Any]:
    present = {key: value for key, value in rest.items() if key in saved}
    single_file.restore_state(present, saved, strict=False)
    for key, value in present.items():
        state[key] = value
    return {key: value for key, value in saved.items() if key not in state and key not in exclude}


def load_full_into_sharded(
    path: str | os.PathLike[str],
    state: dict[str, Any],
    strict: bool,
    *,
    candidates: list[torch.nn.Module],
    weights_only: bool = True,
) -> dict[str, Any]:
    """Load a one-file checkpoint (full state) into sharded modules and optimizers; return the rest."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    data = single_file.read_checkpoint(path, mmap=True, weights_only=weights_only)
    _check_keys(state, set(data), Path(path), strict)
    modules, optimizers, rest = _split(state)
    options = StateDictOptions(full_state_dict=True, strict=strict)
    loaded: set[str] = set()
    for key, module in modules.items():
        if key in data:
            set_model_state_dict(module, data[key], options=options)
            loaded.add(key)
    for key, optimizer in optimizers.items():
        if key not in data:
            continue
        owner = owner_of(optimizer, key, [*modules.values(), *candidates])
        saved = data[key]
        if not optim_keys.is_name_keyed(saved):
            saved = optim_keys.to_name_keyed(saved, optimizer, owner)
        set_optimizer_state_dict(owner, optimizer, saved, options=StateDictOptions(full_state_dict=True))
        loaded.add(key)
    return _restore_rest(state, rest, data, strict, exclude=loaded)


def read_sharded(path: str | os.PathLike[str], weights_only: bool = True) -> dict[str, Any]:
    """Read a whole DCP directory into plain, full CPU tensors (``fabric.load(path)`` without state).

    ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` merges the shards into a
    temporary file next to nothing the user owns, which is then read with ``weights_only=True``.
    """
    import tempfile

    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = Path(path)
    meta = _read_meta(target, weights_only)
    with tempfile.TemporaryDirectory(prefix="handloom-read-") as scratch:
        merged = Path(scratch) / "merged.pt"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            try:
                dcp_to_torch_save(target, merged)
            except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException
                raise RuntimeError(staging.unreadable_message(target, err)) from err
        tensors = single_file.read_checkpoint(merged)
    return {**tensors, **meta["state"]}
