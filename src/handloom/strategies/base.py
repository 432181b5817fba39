"""The strategy contract: how a model, its optimizers and collectives work across processes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from handloom.environments import Topology
from handloom.precision import PrecisionPolicy

if TYPE_CHECKING:
    from handloom.accelerators import Accelerator
    from handloom.checkpoint.state import SaveRequest
    from handloom.devices import AcceleratorName, HardwareProbe
    from handloom.plugins.io import CheckpointIO
    from handloom.plugins.precision import Precision


@dataclass(frozen=True)
class SetupResult:
    """What a strategy made of a model and its optimizers.

    Attributes:
        forward_module: The module that runs the forward pass (e.g. the DDP wrapper).
        module: The user's module as it is now (sharded in place by FSDP; a compiled module unwrapped).
        optimizers: The optimizers, pointing at the parameters ``module`` holds now.
    """

    forward_module: torch.nn.Module
    module: torch.nn.Module
    optimizers: list[torch.optim.Optimizer]


@dataclass(frozen=True, slots=True)
class Runtime:
    """The facts a strategy needs at run time, handed over once before use.

    Attributes:
        accelerator: The concrete accelerator.
        device: This process's device.
        topology: Ranks and world size of this process.
        num_nodes: Nodes in the job.
        precision: The precision policy.
        accelerator_object: The :class:`~handloom.accelerators.Accelerator` in use
            (``fabric.accelerator``).
    """

    accelerator: AcceleratorName
    device: torch.device
    topology: Topology
    num_nodes: int
    precision: PrecisionPolicy
    accelerator_object: Accelerator | None = None


class Strategy:
    """Base class: a single process with no communication.

    Subclasses take their own options in ``__init__``; runtime facts arrive once through
    :meth:`bind`.

    Args:
        accelerator: An :class:`~handloom.accelerators.Accelerator` to use (Lightning's argument);
            ``Fabric(accelerator=...)`` must then be left at ``"auto"``.
        checkpoint_io: A ``CheckpointIO`` plugin for single-file checkpoints (Lightning's argument).
        precision: A precision plugin (Lightning's argument), like ``Fabric(plugins=[plugin])``.
    """

    name: str = "strategy"
    #: True when the strategy runs one process per device.
    is_distributed: bool = False
    #: How processes are started when handloom starts them: "popen", "spawn", "fork" or None.
    start_method: str | None = None
    #: True when the forward pass runs inside a wrapper (DDP, FSDP) that other model methods
    #: would bypass: such methods must be marked with ``mark_forward_method``.
    wraps_forward: bool = False
    #: The precision names the strategy accepts (``None``: all).
    supported_precisions: tuple[str, ...] | None = None
    #: True when ``precision="16-mixed"`` on the CPU becomes ``"bf16-mixed"`` (Lightning's rule,
    #: except under FSDP).
    fp16_mixed_falls_back_on_cpu: bool = True

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
    ) -> None:
        #: True when set-up moves the model to the device itself (Fabric then does not move it first).
        self.places_module_on_setup = False
        self._runtime: Runtime | None = None
        self._amp: Precision | None = None
        #: A precision plugin the user chose (``Fabric(plugins=[...])`` or ``strategy.precision = ...``).
        self._chosen_precision: Precision | None = None
        #: The plugin ``Fabric(precision=<name>)`` stands for, set by the option resolver.
        self._named_precision: Precision | None = None
        self._planned_world_size = 1
        #: The CheckpointIO plugin the user chose; ``None``: handloom's own files (TorchCheckpointIO).
        self._checkpoint_io: CheckpointIO | None = checkpoint_io
        # Lightning's constructor arguments: the option resolver honours them or reports a conflict.
        self._accelerator = _check_accelerator(accelerator, type(self).__name__)
        if precision is not None:
            self.precision = precision

    def check_compatible(
        self, *, accelerator: AcceleratorName, world_size: int, probe: HardwareProbe
    ) -> None:
        """Reject an accelerator or process count the strategy cannot serve (pure; raises ValueError)."""

    def plan_processes(self, world_size: int) -> None:
        """Record how many processes the job will have, for :attr:`world_size` before they start.

        Called by the option resolver. Code that sizes a batch by ``fabric.world_size`` before
        ``fabric.launch()`` then sees the job's size, as under Lightning; :meth:`bind` later gives
        the running process's own facts.
        """
        self._planned_world_size = world_size

    def bind(self, runtime: Runtime) -> None:
        """Give the strategy its runtime facts. Called once per process by Fabric.

        Raises:
            RuntimeError: The strategy is already bound to a different runtime (e.g. the same
                instance passed to two Fabric objects).
        """
        if self._runtime is not None and self._runtime != runtime:
            raise RuntimeError(
                f"This {type(self).__name__} instance is already in use by another Fabric object."
                " Create a new strategy instance for each Fabric."
            )
        self._runtime = runtime
        named = self._named_precision
        if named is not None and named.precision != runtime.precision.name:
            named = None  # planned for another precision (a strategy instance made for a test)
        self._amp = self._chosen_precision or named or self._make_amp(runtime)

    def _make_amp(self, runtime: Runtime) -> Precision:
        return self.precision_plugin_for(runtime.precision, runtime.device.type)

    def precision_plugin_for(self, policy: PrecisionPolicy, device_type: str) -> Precision:
        """The precision plugin ``Fabric(precision=<name>)`` stands for under this strategy."""
        from handloom.plugins.precision.select import plugin_for

        return plugin_for(policy, device_type)

    @property
    def runtime(self) -> Runtime:
        """The bound runtime.

        Raises:
            RuntimeError: Used before the processes were launched.
        """
        if self._runtime is None:
            raise RuntimeError(
                f"The {self.name!r} strategy is not running yet: its processes have not been started."
                " Call fabric.launch() first (or start the script with `handloom run`)."
            )
        return self._runtime

    @property
    def is_bound(self) -> bool:
        """True once :meth:`bind` was called."""
        return self._runtime is not None

    @property
    def amp(self) -> Precision:
        """The precision plugin in use (autocast, casting, gradient scaler), once running."""
        if self._amp is None:
            _ = self.runtime  # raises the "not running yet" error: bind() sets both together
            raise AssertionError("bind() sets the runtime and the precision together")
        return self._amp

    @property
    def precision(self) -> Precision:
        """The precision plugin, as Lightning's ``fabric.strategy.precision``.

        Put it in ``fabric.save``'s state to checkpoint the gradient scaler of ``"16-mixed"``
        (``state_dict()`` is ``{}`` without a scaler)::

            state = {"model": model, "optimizer": optimizer, "precision": fabric.strategy.precision}

        Before the strategy runs it is the plugin chosen for it, or full precision.
        """
        if self._amp is not None:
            return self._amp
        if self._chosen_precision is not None:
            return self._chosen_precision
        if self._named_precision is not None:
            return self._named_precision
        from handloom.plugins.precision import Precision

        return Precision()

    @precision.setter
    def precision(self, plugin: Precision | None) -> None:
        if self._runtime is not None:
            raise RuntimeError(
                f"{type(self).__name__}.precision was set after the strategy started running."
                " Pass the plugin before fabric.launch()/setup, e.g. Fabric(plugins=[plugin])."
            )
        self._chosen_precision = plugin

    @property
    def root_device(self) -> torch.device:
        """This process's device."""
        return self.runtime.device

    @property
    def accelerator(self) -> Accelerator | None:
        """The accelerator: the one given to the constructor, else the one Fabric chose (``None``
        for a strategy no Fabric uses yet)."""
        if self._accelerator is not None:
            return self._accelerator
        return self._runtime.accelerator_object if self._runtime is not None else None

    @accelerator.setter
    def accelerator(self, accelerator: Accelerator) -> None:
        if self._runtime is not None:
            raise RuntimeError(
                f"{type(self).__name__}.accelerator was set after the strategy started running."
                f" Pass it before: {type(self).__name__}(accelerator=...) or Fabric(accelerator=...)."
            )
        self._accelerator = _check_accelerator(accelerator, type(self).__name__)

    @property
    def global_rank(self) -> int:
        """Rank among all processes."""
        return self._runtime.topology.global_rank if self._runtime else 0

    @property
    def local_rank(self) -> int:
        """Rank on this node."""
        return self._runtime.topology.local_rank if self._runtime else 0

    @property
    def node_rank(self) -> int:
        """Index of this node."""
        return self._runtime.topology.node_rank if self._runtime else 0

    @property
    def world_size(self) -> int:
        """Number of processes in the job (before they are started: the number planned)."""
        return self._runtime.topology.world_size if self._runtime else self._planned_world_size

    @property
    def is_global_zero(self) -> bool:
        """True on global rank 0."""
        return self.global_rank == 0

    # --- set-up -------------------------------------------------------------------------------
    def setup_environment(self) -> None:
        """Prepare this process's device through the accelerator (CUDA: make it the current device);
        multi-process strategies then create what they need to communicate."""
        accelerator = self.accelerator
        if accelerator is not None:
            accelerator.setup_device(self.root_device)

    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Return the module that runs the forward pass (a DDP wrapper, or the module itself)."""
        return module

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Prepare an optimizer; most strategies leave it alone."""
        return optimizer

    def setup_module_and_optimizers(
        self, module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]
    ) -> SetupResult:
        """Set up a model together with its optimizers (``fabric.setup(model, *optimizers)``)."""
        forward_module = self.setup_module(module)
        return SetupResult(forward_module, module, [self.setup_optimizer(o) for o in optimizers])

    def register_forward_method(self, module: torch.nn.Module, name: str) -> None:
        """Make ``module.<name>()`` run like ``forward`` does (e.g. with sharded parameters gathered)."""

    def module_init_context(self, empty_init: bool) -> AbstractContextManager[Any]:
        """The context ``fabric.init_module`` adds: with ``empty_init``, weights are left uninitialised."""
        from handloom.init import skip_init_context

        return skip_init_context() if empty_init else contextlib.nullcontext()

    def module_to_device(self, module: torch.nn.Module) -> None:
        """Move ``module``'s parameters and buffers to this process's device."""
        module.to(self.root_device)

    def batch_to_device(self, batch: Any, device: torch.device | None = None) -> Any:
        """Return ``batch`` with every tensor in it moved to ``device`` (default: this process's)."""
        from handloom.apply import move_data_to_device

        return move_data_to_device(batch, device or self.root_device)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int] | None:
        """``{"num_replicas": ..., "rank": ...}`` for a ``DistributedSampler``, or ``None`` when every
        process sees all data."""
        return None

    def no_backward_sync(self, module: torch.nn.Module, enabled: bool) -> AbstractContextManager[Any]:
        """A context in which backward passes accumulate gradients without synchronising them."""
        return contextlib.nullcontext()

    def clip_grad_norm(
        self, parameters: list[torch.Tensor], max_norm: float, norm_type: float, error_if_nonfinite: bool
    ) -> torch.Tensor:
        """Clip gradients to a total norm and return the norm before clipping.

        Raises:
            RuntimeError: ``error_if_nonfinite`` and the norm is NaN or infinite; the message gives it.
        """
        # torch's clip_grad_norm_ in its two public steps, so a non-finite norm is reported with its value.
        grads = [p.grad for p in parameters if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, norm_type)
        if error_if_nonfinite and not torch.isfinite(total).item():
            from handloom.sharding.grads import nonfinite_norm_message

            raise RuntimeError(nonfinite_norm_message(norm_type, total))
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
        return total

    # --- checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoint_io(self) -> CheckpointIO:
        """The plugin that writes and reads the strategy's checkpoint files (default: TorchCheckpointIO)."""
        if self._checkpoint_io is None:
            from handloom.plugins.io import TorchCheckpointIO

            self._checkpoint_io = TorchCheckpointIO()
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO) -> None:
        self._checkpoint_io = io

    def _file_writer(self, request: SaveRequest) -> Callable[[Path, dict[str, Any]], None]:
        """Writes ``request``'s file through the CheckpointIO plugin (handloom's atomic write by default).

        The plugin gets the path as the user wrote it, as in Lightning.
        """
        target = request.path if request.given_path is None else request.given_path
        return lambda _path, payload: self.checkpoint_io.save_checkpoint(payload, target)

    def _read_file(
        self, path: str | os.PathLike[str], weights_only: bool, mmap: bool = False
    ) -> dict[str, Any]:
        """Read one checkpoint file through the CheckpointIO plugin (by default: mapped with ``mmap``)."""
        from handloom.plugins.io import TorchCheckpointIO

        if self._checkpoint_io is None or type(self._checkpoint_io) is TorchCheckpointIO:
            from handloom.checkpoint.io import read_checkpoint

            return read_checkpoint(path, weights_only=weights_only, mmap=mmap)
        return self._checkpoint_io.load_checkpoint(path, weights_only=weights_only)

    def describe(self) -> dict[str, Any]:
        """What a sharded checkpoint's marker records: versions, world size, strategy, precision, time."""
        from handloom.checkpoint import resume

        return resume.describe(
            strategy=type(self).__name__, precision=self.runtime.precision.name, world_size=self.world_size
        )

    def save_checkpoint(self, request: SaveRequest) -> None:
        """Write one file holding exactly the keys of ``request.state`` (one process: no collective)."""
        from handloom.checkpoint import background, state

        state.check_filter(request.state, request.filter)
        request = request.with_ranks([request.rank_entries])
        payload = state.collect_state(request.state, request.filter)
        background.write_file(request.path, payload, request.async_save, self._file_writer(request))

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        state: dict[str, Any] | None,
        strict: bool,
        modules: list[torch.nn.Module],
        weights_only: bool = True,
    ) -> Any:
        """Restore ``state`` in place from a file, or from a sharded directory (resharded to this process)."""
        from handloom import checkpoint
        from handloom.checkpoint import staging
        from handloom.sharding import checkpoint as sharded

        readable = staging.readable(Path(path))
        if readable.is_dir():
            if state is None:
                return sharded.read_sharded(readable, weights_only=weights_only)
            return sharded.load_sharded(
                readable, state, strict, candidates=modules, weights_only=weights_only
            )
        data = self._read_file(path, weights_only)
        if state is None:
            return data
        return checkpoint.restore_state(state, data, strict)

    # --- collectives (identity for one process) --------------------------------------------------
    def barrier(self, name: str | None = None) -> None:
        """Wait until every process reaches this point."""

    def any_rank(self, flag: bool, what: str) -> bool:
        """True on every process when ``flag`` is True on any (``what`` names the call in errors)."""
        return flag

    def all_reduce(self, tensor: torch.Tensor, reduce_op: Any = "mean", group: Any = None) -> torch.Tensor:
        """Reduce ``tensor`` over processes in place and return it (one process: returned as is)."""
        from handloom.distributed import resolve_reduce_op

        resolve_reduce_op(reduce_op)  # reject unknown names even with one process
        return tensor

    def all_gather(self, tensor: torch.Tensor, group: Any = None) -> torch.Tensor | list[torch.Tensor]:
        """Gather ``tensor`` from every process."""
        return tensor

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Send ``obj`` from ``src`` to every process."""
        return obj

    def teardown(self) -> None:
        """Release what :meth:`setup_environment` created."""

    def __getstate__(self) -> dict[str, Any]:
        # Runtime facts belong to one process; a strategy sent to a new process is bound again there.
        state = self.__dict__.copy()
        state["_runtime"] = None
        state["_amp"] = None
        return state


def _check_accelerator(accelerator: object, owner: str) -> Accelerator | None:
    """``accelerator`` if it is ``None`` or an Accelerator instance.

    Raises:
        TypeError: Anything else (a name belongs in ``Fabric(accelerator=...)``).
    """
    if accelerator is None:
        return None
    from handloom.accelerators import Accelerator

    if not isinstance(accelerator, Accelerator):
        raise TypeError(
            f"{owner}(accelerator={accelerator!r}) must be an Accelerator instance such as CPUAccelerator()."
            " To choose one by name, pass it to Fabric(accelerator=...) instead."
        )
    return accelerator
