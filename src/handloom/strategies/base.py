"""The strategy contract: how a model, its optimizers and collectives work across processes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from handloom.amp import AmpRunner
from handloom.environments import Topology
from handloom.precision import PrecisionPolicy

if TYPE_CHECKING:
    from handloom.checkpoint.state import SaveRequest
    from handloom.devices import AcceleratorName, HardwareProbe


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
    """

    accelerator: AcceleratorName
    device: torch.device
    topology: Topology
    num_nodes: int
    precision: PrecisionPolicy


class Strategy:
    """Base class: a single process with no communication.

    Subclasses take their own options in ``__init__``; runtime facts arrive once through
    :meth:`bind`.
    """

    name: str = "strategy"
    #: True when the strategy runs one process per device.
    is_distributed: bool = False
    #: How processes are started when handloom starts them: "popen", "spawn", "fork" or None.
    start_method: str | None = None
    #: True when the forward pass runs inside a wrapper (DDP, FSDP) that other model methods
    #: would bypass: such methods must be marked with ``mark_forward_method``.
    wraps_forward: bool = False

    def __init__(self) -> None:
        #: True when set-up moves the model to the device itself (Fabric then does not move it first).
        self.places_module_on_setup = False
        self._runtime: Runtime | None = None
        self._amp: AmpRunner | None = None
        self._planned_world_size = 1

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
        self._amp = self._make_amp(runtime)

    def _make_amp(self, runtime: Runtime) -> AmpRunner:
        """The precision runner for this strategy (autocast and a gradient scaler by default)."""
        return AmpRunner(runtime.precision, runtime.device.type)

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
    def amp(self) -> AmpRunner:
        """The precision realisation (autocast, casting, gradient scaler)."""
        if self._amp is None:
            _ = self.runtime  # raises the "not running yet" error: bind() sets both together
            raise AssertionError("bind() sets the runtime and the precision together")
        return self._amp

    @property
    def precision(self) -> AmpRunner:
        """The precision runner, as Lightning's ``fabric.strategy.precision``.

        Put it in ``fabric.save``'s state to checkpoint the gradient scaler of ``"16-mixed"``
        (``state_dict()`` is ``{}`` without a scaler)::

            state = {"model": model, "optimizer": optimizer, "precision": fabric.strategy.precision}
        """
        return self.amp

    @property
    def root_device(self) -> torch.device:
        """This process's device."""
        return self.runtime.device

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
        """Create what the strategy needs to communicate (nothing for a single process)."""

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

    @property
    def distributed_sampler_kwargs(self) -> tuple[int, int] | None:
        """``(num_replicas, rank)`` for data sharding, or ``None`` when every process sees all data."""
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
        background.write_file(request.path, payload, request.async_save)

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
        data = checkpoint.read_checkpoint(path, weights_only=weights_only)
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
