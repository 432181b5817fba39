"""Apply FSDP2 (``fully_shard``), activation checkpointing and per-block compilation to a model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule, fully_shard

from handloom.sharding.policy import ModulePolicy, select_modules


def has_sharded_submodule(module: torch.nn.Module) -> bool:
    """True when the user already called ``fully_shard`` on ``module`` or one of its submodules."""
    return any(isinstance(m, FSDPModule) for m in module.modules())


class _CheckpointedForward:
    """A block's ``forward`` run through ``torch.utils.checkpoint.checkpoint`` (non-reentrant).

    Installed as an instance attribute, so the block keeps its class, hooks and parameter names
    (state-dict keys stay those of the user's model, unlike with a wrapper module). FSDP2's hooks
    run around it: the block's parameters are gathered before its forward and again before the
    recomputation in backward.
    """

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def is_checkpointed(module: torch.nn.Module) -> bool:
    """True when :func:`apply_activation_checkpointing` chose ``module``."""
    return isinstance(module.__dict__.get("forward"), _CheckpointedForward)


def apply_activation_checkpointing(module: torch.nn.Module, policy: ModulePolicy) -> list[torch.nn.Module]:
    """Recompute the activations of each module ``policy`` picks during backward, keeping parameter names.

    Returns:
        The modules that will be checkpointed.
    """
    chosen = select_modules(module, policy, include_root=False)
    for block in chosen:
        if not is_checkpointed(block):
            block.forward = _CheckpointedForward(block.forward)
    return chosen


def compile_blocks(blocks: list[torch.nn.Module], compiler: Callable[[Callable[..., Any]], Any]) -> None:
    """Compile each block in place with ``compiler`` (the user's ``torch.compile`` context).

    This is what ``nn.Module.compile`` does; names and parameters of the blocks do not change.
    """
    for block in blocks:
        block._compiled_call_impl = compiler(block._call_impl)


def shard_model(
    module: torch.nn.Module,
    wrap_policy: ModulePolicy | None,
    shard_kwargs: dict[str, Any],
    root_kwargs: dict[str, Any] | None = None,
) -> list[torch.nn.Module]:
    """Call ``fully_shard`` on each block the policy picks, children first, then on the root.

    Blocks the user sharded already are left alone, and so is the policy when any submodule is
    sharded (the user chose the units).

    Returns:
        The blocks that became their own FSDP unit (without the root).
    """
    blocks: list[torch.nn.Module] = []
    if wrap_policy is not None and not has_sharded_submodule(module):
        blocks = select_modules(module, wrap_policy, include_root=False)
        for block in blocks:
            fully_shard(block, **shard_kwargs)
    if not isinstance(module, FSDPModule):
        fully_shard(module, **{**shard_kwargs, **(root_kwargs or {})})
    return blocks
