"""What FSDP and model-parallel training share: sharded set-up, gradient sync, clipping, checkpoints."""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from handloom.strategies.base import SetupResult
from handloom.strategies.parallel import ParallelStrategy

if TYPE_CHECKING:
    from handloom.checkpoint.state import SaveRequest
    from handloom.plugins.io import CheckpointIO


def _unwrap_compiled(module: torch.nn.Module) -> tuple[torch.nn.Module, Callable[..., Any] | None]:
    """``(module, None)``, or ``(original, compile_context)`` for a ``torch.compile``'d module."""
    from handloom.wrappers import compiled_original

    original = compiled_original(module)
    if original is None:
        return module, None
    compiler: Callable[..., Any] | None = module.__dict__.get("dynamo_ctx")
    return original, compiler


@contextlib.contextmanager
def _gradient_sync_off(module: torch.nn.Module) -> Iterator[None]:
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True, recurse=False)


class ShardedStrategy(ParallelStrategy):
    """Base of strategies whose parameters are DTensors: FSDP2 and tensor parallelism.

    Set-up rules shared by subclasses:

    * ``fabric.setup(model, optimizer)`` shards the model and re-points the optimizer, which must
      not have stepped yet, at the shards.
    * ``fabric.setup_optimizers(optimizer)`` after ``fabric.setup_module(model)`` needs an optimizer
      built from the sharded model's parameters; one built before is an error showing the order.
    * ``fabric.init_module(empty_init=True)`` builds on the meta device; set-up then allocates and
      initialises only each rank's shards.
    """

    def __init__(
        self,
        state_dict_type: str,
        process_group_backend: str | None,
        timeout: Any,
        start_method: str,
        save_timeout: timedelta,
        check_collectives: bool,
        **lightning_args: Any,
    ) -> None:
        # lightning_args: Lightning's accelerator, parallel_devices, cluster_environment, precision.
        super().__init__(
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            check_collectives=check_collectives,
            save_timeout=save_timeout,
            **lightning_args,
        )
        self.state_dict_type = state_dict_type
        # Sharding places parameters itself (fully_shard moves each unit as it shards it).
        self.places_module_on_setup = True
        # id -> (weak reference, path) of parameters that sharding replaced; see setup_optimizer.
        self._replaced: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}

    @override
    def setup_environment(self) -> None:
        # As Lightning's FSDP and ModelParallel strategies do: every process starts its training
        # from the seed seed_everything() exported (PL_GLOBAL_SEED), whatever ran since.
        from handloom.seed import reset_seed

        reset_seed()
        super().setup_environment()

    # --- subclasses implement -------------------------------------------------------------------
    def _shard(self, module: torch.nn.Module, compiler: Callable[..., Any] | None) -> torch.nn.Module:
        """Shard ``module`` (in place where the machinery allows) and return it."""
        raise NotImplementedError

    # --- set-up ---------------------------------------------------------------------------------
    @override
    def module_init_context(self, empty_init: bool) -> AbstractContextManager[Any]:
        return torch.device("meta") if empty_init else contextlib.nullcontext()

    @override
    def module_to_device(self, module: torch.nn.Module) -> None:
        from handloom.sharding.materialize import has_meta_tensors

        if not has_meta_tensors(module):
            module.to(self.root_device)

    @override
    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.setup_module_and_optimizers(module, ()).module

    @override
    def setup_module_and_optimizers(
        self, module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]
    ) -> SetupResult:
        from torch.distributed.fsdp import FullyShardedDataParallel

        from handloom.sharding.materialize import has_meta_tensors, materialize
        from handloom.sharding.optim import repoint_optimizer

        original, compiler = _unwrap_compiled(module)
        if isinstance(original, FullyShardedDataParallel):
            raise TypeError(
                f"{type(self).__name__} got a model wrapped in FSDP1's FullyShardedDataParallel. Pass the"
                " plain model: handloom shards it with FSDP2 (fully_shard)."
            )
        before = dict(original.named_parameters())
        names = {id(param): name for name, param in before.items()}
        sharded = self._shard(original, compiler)
        if not isinstance(sharded, torch.nn.Module):
            raise TypeError(
                f"{type(self).__name__}: sharding returned {type(sharded).__name__}, not a torch.nn.Module."
            )
        if has_meta_tensors(sharded):
            without_reset = materialize(sharded, self.root_device)
            if without_reset:
                warnings.warn(
                    "These submodules were built on the meta device (fabric.init_module(empty_init=True))"
                    " and have no reset_parameters(), so their weights are uninitialised:"
                    f" {', '.join(without_reset)}."
                    " Load a checkpoint into the model, or give those modules a reset_parameters method.",
                    stacklevel=4,
                )
        after = dict(sharded.named_parameters())
        for name, param in before.items():
            if after.get(name) is not param:
                self._replaced[id(param)] = (weakref.ref(param), name)
        for optimizer in optimizers:
            repoint_optimizer(optimizer, names, sharded, type(self).__name__)
        return SetupResult(sharded, sharded, [self.setup_optimizer(o) for o in optimizers])

    @override
    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        for group in optimizer.param_groups:
            for param in group["params"]:
                entry = self._replaced.get(id(param))
                if entry is not None and entry[0]() is param:
                    raise RuntimeError(
                        f"The {type(optimizer).__name__} was created before its model was sharded: it holds"
                        f" the unsharded parameter {entry[1]!r}, which {type(self).__name__} replaced."
                        " Create the optimizer after setting up the model:\n"
                        "    model = fabric.setup_module(model)\n"
                        "    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters()))\n"
                        "or set both up together with fabric.setup(model, optimizer)."
                    )
        return optimizer

    @override
    def register_forward_method(self, module: torch.nn.Module, name: str) -> None:
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

        if isinstance(module, FSDPModule):
            register_fsdp_forward_method(module, name)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_replaced"] = {}  # weak references, and only meaningful in the process that set up
        state["_mesh"] = None
        return state

    # --- the training step ----------------------------------------------------------------------
    @override
    def no_backward_sync(self, module: torch.nn.Module, enabled: bool) -> AbstractContextManager[Any]:
        if not enabled:
            return contextlib.nullcontext()
        return _gradient_sync_off(module)

    @override
    def clip_grad_norm(
        self, parameters: list[torch.Tensor], max_norm: float, norm_type: float, error_if_nonfinite: bool
    ) -> torch.Tensor:
        from handloom.sharding.grads import clip_grad_norm

        return clip_grad_norm(parameters, max_norm, norm_type, error_if_nonfinite)

    # --- checkpoints ----------------------------------------------------------------------------
    @property
    @override
    def checkpoint_io(self) -> CheckpointIO:
        """Not available: sharded strategies write their checkpoints themselves, as in Lightning.

        Raises:
            NotImplementedError: Always.
        """
        raise NotImplementedError(
            f"{type(self).__name__}.checkpoint_io does not exist: {type(self).__name__} writes its"
            " checkpoints itself (a directory of shards, or one file with state_dict_type='full'), not"
            " through a CheckpointIO plugin. Save and load with fabric.save and fabric.load."
        )

    @checkpoint_io.setter
    @override
    def checkpoint_io(self, io: CheckpointIO) -> None:
        raise NotImplementedError(
            f"Fabric(strategy={self.name!r}, plugins=[{type(io).__name__}()]) cannot save through a"
            f" CheckpointIO plugin: {type(self).__name__} writes its checkpoints itself (a directory of"
            " shards, or one file with state_dict_type='full'). Leave the CheckpointIO out of plugins,"
            " or use strategy='ddp', which saves through it."
        )

    @override
    def save_checkpoint(self, request: SaveRequest) -> None:
        """Every rank calls it: a directory of shards (staged, then committed), or one full file."""
        from handloom.checkpoint import background, staging
        from handloom.checkpoint import state as user_state
        from handloom.sharding import checkpoint as sharded

        user_state.check_filter(request.state, request.filter)
        background.wait()
        request = self._agree_on_save(request)
        if self.state_dict_type == "full":
            sharded.save_full(request, self._from_rank_zero)
            return
        problem: str | None = None
        if self.global_rank == 0:
            try:
                staging.prepare(request.path)
            except OSError as err:  # said on every rank below, so none waits for the others
                problem = str(err)
        problem = self._from_rank_zero(problem)
        if problem is not None:
            raise FileExistsError(problem)
        sharded.save_sharded(request, self._checkpoint_group, self.describe())

    @override
    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        state: dict[str, Any] | None,
        strict: bool,
        modules: list[torch.nn.Module],
        weights_only: bool = True,
    ) -> Any:
        from handloom.sharding import checkpoint as sharded

        if state is None or sharded.is_sharded_checkpoint(path):
            return super().load_checkpoint(path, state, strict, modules, weights_only)
        return sharded.load_full_into_sharded(
            path, state, strict, candidates=modules, weights_only=weights_only
        )
