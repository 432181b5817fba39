"""Merging a sharded checkpoint directory into one file that ``torch.load`` reads without handloom.

The result holds, under the same keys as the sharded checkpoint, full model state dicts, optimizer
state dicts in ``torch.optim``'s position-keyed form (so ``optimizer.load_state_dict`` takes them),
and the other saved values (dataloader positions and random states under the keys they were
saved with). It is written atomically. The whole state passes
through CPU memory once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from handloom.checkpoint import resume, staging
from handloom.checkpoint.io import write_atomic


def consolidate(
    checkpoint_dir: str | os.PathLike[str], output_file: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write the full state of the sharded checkpoint ``checkpoint_dir`` to ``output_file``.

    Raises:
        FileNotFoundError: ``checkpoint_dir`` is not a complete sharded checkpoint.
        FileExistsError: ``output_file`` exists and ``overwrite`` is false.
        RuntimeError: A file of the checkpoint is damaged; the message names it.
    """
    from handloom.sharding.checkpoint import read_sharded

    source, target = Path(checkpoint_dir), Path(output_file)
    if source.is_file():
        raise FileNotFoundError(
            f"Cannot consolidate {str(source)!r}: it is a file, not a sharded checkpoint directory."
            " A single-file checkpoint needs no consolidation: torch.load reads it as it is."
        )
    if not source.is_dir():
        raise FileNotFoundError(
            f"Cannot consolidate {str(source)!r}: nothing is at that path, so it is not a sharded"
            " checkpoint directory. Check the path: pass the directory fabric.save wrote under FSDP or"
            " ModelParallel."
        )
    if not staging.is_complete(source):
        raise FileNotFoundError(staging.incomplete_message(source))
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"The output file {str(target)!r} already exists. Choose another output file, or replace it"
            " with --overwrite (overwrite=True)."
        )
    data = resume.drop_legacy(read_sharded(source), None)  # a damaged shard is a RuntimeError naming it
    write_atomic(target, {key: _position_keyed(value) for key, value in data.items()})
    return target


def _position_keyed(value: Any) -> Any:
    """An optimizer state dict keyed by parameter path becomes position-keyed; anything else passes."""
    if not (isinstance(value, dict) and set(value) == {"state", "param_groups"}):
        return value
    groups = value["param_groups"]
    names = [name for group in groups for name in group.get("params", [])]
    if not names or not all(isinstance(name, str) for name in names):
        return value
    position = {name: index for index, name in enumerate(names)}
    return {
        "state": {position[name]: entry for name, entry in value["state"].items()},
        "param_groups": [{**group, "params": [position[n] for n in group["params"]]} for group in groups],
    }
