"""The ``Fabric`` facade: the user keeps the loop, Fabric owns devices, precision and processes."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import weakref
from collections.abc import Callable, Generator, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, SupportsInt

import torch
from torch.utils.data import DataLoader

from handloom import launcher, preemption, validation
from handloom.apply import apply_to_tensors, convert_to_tensors, move_data_to_device
from handloom.device_dtype import _update_properties
from handloom.devices import probe_hardware
from handloom.environments import Topology, read_topology, record_ranks
from handloom.loggers import _fabric as _loggers
from handloom.options import FabricOptions, Plan, resolve_plan
from handloom.strategies.base import Runtime, Strategy
from handloom.utilities import rank_zero
from handloom.wrappers import (
    _FabricDataLoader,
    _FabricModule,
    _FabricOptimizer,
    compiled_original,
    parameter_device,
)

if TYPE_CHECKING:
    from handloom.accelerators import Accelerator
    from handloom.checkpoint.session import CheckpointSession


class Fabric:
    """Scale a plain PyTorch training loop across devices, precisions and processes.

    Args:
        accelerator: ``"cpu"``, ``"cuda"``, ``"gpu"``, ``"mps"``, ``"auto"``, or an
            :class:`~handloom.accelerators.Accelerator` instance (``CUDAAccelerator()``, or your own).
        strategy: ``"auto"``, ``"ddp"``, ``"ddp_spawn"``, ``"ddp_fork"``, ``"ddp_notebook"``,
            ``"ddp_find_unused_parameters_true"``, ``"dp"``, ``"fsdp"``, ``"fsdp_cpu_offload"``, or a
            strategy instance (``DDPStrategy``, ``FSDPStrategy``, ``ModelParallelStrategy``, ...).
        devices: Devices per node: an int (``-1`` for all), a list of indices, a string such as
            ``"2"`` or ``"0,1"``, or ``"auto"``.
        num_nodes: Number of machines.
        precision: ``"32-true"`` (default), ``"64-true"``, ``"16-mixed"``, ``"bf16-mixed"``,
            ``"16-true"``, ``"bf16-true"`` or a legacy alias (``"32"``, ``"16"``, ``"bf16"``, 32, 16, 64).
        plugins: A plugin or a list of them, at most one of each kind (``handloom.plugins``): a
            ``ClusterEnvironment`` to use instead of detection, a ``CheckpointIO`` that stores
            single-file checkpoints, a ``Precision``.
        callbacks: An object or a list of objects whose methods ``fabric.call(name, ...)`` invokes.
        loggers: A logger or a list of them (``handloom.loggers.CSVLogger``, ``TensorBoardLogger``, or
            any object with ``log_metrics(metrics, step)``), used by ``fabric.log``. They are
            finalised at interpreter exit and when a launched worker function returns.

    Raises:
        ValueError: An unknown, unavailable or conflicting choice (the message names it).
        TypeError: A logger without a ``log_metrics`` method.

    Example::

        fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
        fabric.launch()
        model, optimizer = fabric.setup(model, optimizer)
        loader = fabric.setup_dataloaders(loader)
        for x, y in loader:
            loss = loss_fn(model(x), y)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    """

    def __init__(
        self,
        *,
        accelerator: str | Accelerator = "auto",
        strategy: str | Strategy = "auto",
        devices: int | str | list[int] | tuple[int, ...] = "auto",
        num_nodes: int = 1,
        precision: str | int | None = None,
        plugins: Any = None,
        callbacks: Any = None,
        loggers: Any = None,
    ) -> None:
        options = FabricOptions(
            accelerator, strategy, devices, num_nodes, precision, validation.as_list(plugins)
        )
        self._plan: Plan = resolve_plan(options, os.environ, probe_hardware())
        self._strategy: Strategy = self._plan.strategy
        self._callbacks: list[Any] = validation.as_list(callbacks)
        self._loggers: list[Any] = _loggers.check_loggers(validation.as_list(loggers))
        self._launched = False
        self._setup_objects: weakref.WeakSet[Any] = weakref.WeakSet()
        self._modules_set_up = False  # read by every backward: a flag, not a walk of _setup_objects
        self._checkpoints = self._new_checkpoint_session()
        self._preemption: preemption.PreemptionWatcher | None = None
        if self._plan.launch in ("none", "external"):
            self._bind(self._plan.topology)
        if type(self).run is not Fabric.run:
            user_run = self.run
            self.run = functools.partial(self._launch_run, user_run)  # type: ignore[method-assign]

    # --- processes ------------------------------------------------------------------------------
    def _bind(self, topology: Topology) -> None:
        plan = self._plan
        if plan.accelerator == "cpu":
            device = torch.device("cpu")
        elif self._strategy.is_distributed:
            device = torch.device(plan.accelerator, plan.device_indices[topology.local_rank])
        else:
            device = torch.device(plan.accelerator, plan.device_indices[0])
        runtime = Runtime(
            plan.accelerator, device, topology, plan.num_nodes, plan.precision, plan.accelerator_object
        )
        self._strategy.bind(runtime)
        _loggers.bind_rank(self._loggers, topology.global_rank)
        rank_zero._follow_rank(topology.global_rank)  # rank_zero_only.rank, as Lightning's strategies set it
        if topology.creates_processes_externally:
            launcher.install_failure_recorder()

    def _enter_worker(self) -> None:
        """In a process started by :meth:`launch`, read its rank and join the process group."""
        _, topology = read_topology(
            explicit=self._plan.environment if self._plan.launch == "external" else None
        )
        record_ranks(self._plan.environment, topology)  # as Lightning's strategies tell the environment
        self._bind(topology)
        self._setup_environment()

    def _setup_environment(self) -> None:
        if not self._launched:
            self._strategy.setup_environment()
            self._launched = True
            if self.world_size > 1:
                # A collective on every rank, with or without loggers, so ranks never wait on each other.
                _loggers.agree_on_versions(self._loggers, self.global_rank, self._strategy.broadcast)

    def _ensure_running(self) -> None:
        if self._launched:
            return
        if self._plan.launch in ("none", "external"):
            self._setup_environment()
            return
        raise RuntimeError(
            f"Fabric(strategy={self._strategy.name!r}, devices={self._plan.num_processes}) runs several"
            " processes, which have not been started. Call fabric.launch() (or fabric.launch(fn)) before"
            " this, or start the script with `handloom run`."
        )

    def launch(self, function: Callable[..., Any] | None = None, *args: Any, **kwargs: Any) -> Any:
        """Start the processes (one per device) and join them into a process group.

        With ``strategy="ddp"`` the script's command is re-run for every other device and the
        calling process goes on as rank 0, as in Lightning; if a rank fails, the others are stopped
        and the job ends with a non-zero status. With ``"ddp_spawn"``/``"ddp_fork"``/``"ddp_notebook"``,
        ``function(fabric, *args, **kwargs)`` runs in each new process and rank 0's result is
        returned. Under an external launcher (``handloom run``, torchrun, srun) the processes exist
        already: ``launch`` joins the process group and calls ``function`` if given.

        Raises:
            TypeError: ``function`` is not callable or takes no argument, or a spawn/fork strategy
                was launched without a function.
        """
        if function is not None:
            validation.check_launch_function(function)
        mode = self._plan.launch
        if mode in ("none", "external"):
            self._setup_environment()
            return function(self, *args, **kwargs) if function is not None else None
        spec = launcher.spec_from_topology(
            self._plan.topology, self._plan.num_processes, self._plan.num_nodes
        )
        if mode == "script":
            from handloom import script_launcher

            script_launcher.start_workers(spec, launcher.script_command())
            self._enter_worker()
            return function(self, *args, **kwargs) if function is not None else None
        if function is None:
            raise TypeError(
                f"Fabric(strategy={self._strategy.name!r}) starts a function in each new process, so it needs"
                " one: call fabric.launch(train) where train(fabric, ...) holds your training code."
            )
        _loggers.flush(self._loggers)  # the workers get copies of the loggers, not of unwritten rows
        # Workers end with os._exit (no atexit hooks), so their loggers are finalised here.
        worker_fn = functools.partial(_run_then_finalize_loggers, function)
        return launcher.launch_function(spec, mode, self, worker_fn, args, kwargs)

    def _launch_run(self, user_run: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.launch(lambda fabric, *a, **kw: user_run(*a, **kw), *args, **kwargs)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Override in a subclass; calling ``fabric.run(...)`` then launches the processes and runs it."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_setup_objects"] = None
        state["_modules_set_up"] = False  # the new process sets up its own
        state["_checkpoints"] = None
        state["_preemption"] = None  # signal handlers belong to the process that installed them
        state["_launched"] = False
        state.pop("run", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup_objects = weakref.WeakSet()
        self._checkpoints = self._new_checkpoint_session()

    def _new_checkpoint_session(self) -> CheckpointSession:
        from handloom.checkpoint.session import CheckpointSession

        return CheckpointSession(self._strategy, lambda: self._finalize_loggers("failed"))

    # --- properties -----------------------------------------------------------------------------
    @property
    def strategy(self) -> Strategy:
        """The strategy in use."""
        return self._strategy

    @property
    def accelerator(self) -> Accelerator:
        """The accelerator in use, e.g. ``CUDAAccelerator()`` (``fabric.accelerator.name()`` gives
        ``"cpu"``, ``"cuda"`` or ``"mps"``; ``fabric.device.type`` gives the same)."""
        assert self._plan.accelerator_object is not None  # the resolver always sets it
        return self._plan.accelerator_object

    @property
    def device(self) -> torch.device:
        """This process's device."""
        if not self._strategy.is_bound:
            self._ensure_running()
        return self._strategy.root_device

    @property
    def global_rank(self) -> int:
        """Rank of this process among all processes."""
        return self._strategy.global_rank

    @property
    def local_rank(self) -> int:
        """Rank of this process on its node."""
        return self._strategy.local_rank

    @property
    def node_rank(self) -> int:
        """Index of this process's node."""
        return self._strategy.node_rank

    @property
    def world_size(self) -> int:
        """Number of processes in the job; before :meth:`launch` starts them, the number planned
        (devices x num_nodes), while the ranks read 0."""
        return self._strategy.world_size

    @property
    def is_global_zero(self) -> bool:
        """True on the process with global rank 0."""
        return self._strategy.is_global_zero

    @property
    def loggers(self) -> list[Any]:
        """The loggers passed to the constructor, as a list."""
        return self._loggers

    @property
    def logger(self) -> Any:
        """The first logger.

        Raises:
            RuntimeError: No logger was given (also an ``IndexError``, as in Lightning).
        """
        if not self._loggers:
            raise _loggers.NoLoggerError(
                "fabric.logger is undefined: no logger was given. Pass one, e.g."
                " Fabric(loggers=CSVLogger('logs')) with CSVLogger from handloom.loggers."
            )
        return self._loggers[0]

    # --- set-up ---------------------------------------------------------------------------------
    def setup(
        self,
        module: torch.nn.Module,
        *optimizers: torch.optim.Optimizer,
        scheduler: Any = None,
        move_to_device: bool = True,
    ) -> Any:
        """Prepare a model and its optimizers: precision, device placement, strategy wrapping.

        Returns:
            The wrapped model, or ``(model, *optimizers)``, with ``scheduler`` appended if given.

        Raises:
            ValueError: An object was already set up.
            TypeError: ``module`` is not a ``torch.nn.Module`` or an optimizer is not an optimizer.
        """
        self._ensure_running()
        validation.check_module(module, self._setup_objects)
        for optimizer in optimizers:
            validation.check_optimizer(optimizer, self._setup_objects)
        wrapped, wrapped_optimizers = self._wrap(module, optimizers, move_to_device)
        self._attach(module, wrapped_optimizers)
        self.call("on_after_setup", fabric=self, module=wrapped)
        outputs: list[Any] = [wrapped, *wrapped_optimizers]
        if scheduler is not None:
            outputs.append(scheduler)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def setup_module(self, module: torch.nn.Module, move_to_device: bool = True) -> _FabricModule:
        """Prepare a model alone (its optimizers go through :meth:`setup_optimizers`)."""
        self._ensure_running()
        validation.check_module(module, self._setup_objects)
        wrapped, _ = self._wrap(module, (), move_to_device)
        self._attach(module, None)
        return wrapped

    def setup_optimizers(self, *optimizers: torch.optim.Optimizer) -> Any:
        """Prepare optimizers; returns one optimizer or a tuple.

        Raises:
            ValueError: No optimizer given, or one was already set up.
        """
        self._ensure_running()
        if not optimizers:
            raise ValueError("fabric.setup_optimizers() got no optimizer. Pass at least one.")
        for optimizer in optimizers:
            validation.check_optimizer(optimizer, self._setup_objects)
        wrapped = [self._wrap_optimizer(o) for o in optimizers]
        return wrapped[0] if len(wrapped) == 1 else tuple(wrapped)

    def _attach(self, module: torch.nn.Module, optimizers: list[_FabricOptimizer] | None) -> None:
        """Give a module with a ``_fabric`` attribute (a LightningModule) this Fabric, as Lightning does.

        Its ``self.log``, ``self.logger`` and ``self.optimizers()`` then work, and its hooks are
        called by :meth:`call` like a callback's.
        """
        if not hasattr(module, "_fabric"):
            return
        setattr(module, "_fabric", self)  # noqa: B010 (torch types module attributes as tensors)
        if optimizers is not None:
            setattr(module, "_fabric_optimizers", optimizers)  # noqa: B010
        if not any(callback is module for callback in self._callbacks):
            self._callbacks.append(module)

    def _wrap(
        self, module: torch.nn.Module, optimizers: tuple[torch.optim.Optimizer, ...], move_to_device: bool
    ) -> tuple[_FabricModule, list[_FabricOptimizer]]:
        strategy = self._strategy
        module = strategy.amp.convert_module(module)
        if move_to_device and not strategy.places_module_on_setup:
            strategy.module_to_device(module)
        result = strategy.setup_module_and_optimizers(module, optimizers)
        self._setup_objects.add(module)
        self._setup_objects.add(result.module)
        self._modules_set_up = True
        for optimizer in optimizers:
            self._setup_objects.add(optimizer)
        wrapped_optimizers = [_FabricOptimizer(o, strategy, self._callbacks) for o in result.optimizers]
        # A module compiled before setup runs compiled, but its state dict and attributes are the original's.
        original = compiled_original(result.module) or result.module
        wrapped = _FabricModule(result.forward_module, original, strategy)
        # As in Lightning: `.device` is Fabric's device, or where the parameters are when not moved.
        _update_properties(wrapped, device=self.device if move_to_device else parameter_device(original))
        return wrapped, wrapped_optimizers

    def _wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> _FabricOptimizer:
        self._setup_objects.add(optimizer)
        return _FabricOptimizer(self._strategy.setup_optimizer(optimizer), self._strategy, self._callbacks)

    def setup_dataloaders(
        self, *dataloaders: DataLoader[Any], use_distributed_sampler: bool = True, move_to_device: bool = True
    ) -> Any:
        """Shard each DataLoader across processes and move its batches to the device.

        Returns:
            One wrapped loader, or a list of them.

        Raises:
            ValueError: No loader given, or a loader already set up.
            TypeError: An argument that is not a ``torch.utils.data.DataLoader``.
        """
        self._ensure_running()
        if not dataloaders:
            raise ValueError("fabric.setup_dataloaders() got no dataloader. Pass at least one.")
        wrapped = [self._setup_dataloader(dl, use_distributed_sampler, move_to_device) for dl in dataloaders]
        return wrapped[0] if len(wrapped) == 1 else wrapped

    def _setup_dataloader(self, loader: Any, distributed: bool, move: bool) -> _FabricDataLoader:
        from handloom import data, seed

        if isinstance(loader, _FabricDataLoader):
            raise ValueError(
                "fabric.setup_dataloaders() got a dataloader that is already set up. Set it up once."
            )
        if not isinstance(loader, DataLoader):
            raise TypeError(
                f"fabric.setup_dataloaders() needs torch.utils.data.DataLoader objects, got"
                f" {type(loader).__name__}. Wrap your data in a DataLoader first."
            )
        sharding = self._strategy.distributed_sampler_kwargs
        if distributed and sharding is not None:
            loader = data.build_distributed_dataloader(
                loader,
                num_replicas=sharding["num_replicas"],
                rank=sharding["rank"],
                seed=seed.current_seed() or 0,
            )
        base_seed = seed.current_seed()
        if seed.seed_workers_enabled() and base_seed is not None and loader.num_workers > 0:
            loader = copy.copy(loader)
            # DataLoader does not guard worker_init_fn after construction; the user's loader is untouched.
            loader.worker_init_fn = seed.WorkerSeeder(self.global_rank, base_seed, loader.worker_init_fn)
        device = self.device if move and self.device.type != "cpu" else None
        return _FabricDataLoader(loader, device)

    # --- the training step ----------------------------------------------------------------------
    def backward(self, tensor: torch.Tensor, *args: Any, model: Any = None, **kwargs: Any) -> None:
        """Replace ``loss.backward()``: scales the loss for fp16 mixed precision.

        Raises:
            RuntimeError: Several processes run and no model was set up with ``fabric.setup``, so
                no gradient would be synchronised (one process may optimise raw tensors).
        """
        amp = self._strategy.amp
        if not self._modules_set_up and self._strategy.is_distributed and self.world_size > 1:
            raise RuntimeError(
                f"fabric.backward(loss) runs under strategy={self._strategy.name!r} on {self.world_size}"
                " processes, but no model was set up with this Fabric. Only a model returned by"
                " fabric.setup() has its gradients synchronised, so each process would train its own"
                " copy. Call model, optimizer = fabric.setup(model, optimizer) before the loop and compute"
                " the loss with the returned model."
            )
        module = model._forward_module if isinstance(model, _FabricModule) else model
        amp.run_backward(tensor, module, *args, **kwargs)

    def clip_gradients(
        self,
        module: Any,
        optimizer: Any,
        clip_val: float | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = True,
    ) -> torch.Tensor | None:
        """Clip gradients by value or by total norm, unscaling fp16 gradients first.

        Returns:
            The total gradient norm before clipping (for ``max_norm``), else ``None``.

        Raises:
            ValueError: Both or neither of ``clip_val`` and ``max_norm`` given.
            TypeError: ``module`` or ``optimizer`` was not set up by Fabric.
        """
        validation.require_set_up(module, _FabricModule, "clip_gradients")
        validation.require_set_up(optimizer, _FabricOptimizer, "clip_gradients")
        validation.check_clip_arguments(clip_val, max_norm)
        amp = self._strategy.amp
        amp.unscale_gradients(optimizer.optimizer)
        params: list[torch.Tensor] = [p for p in amp.main_params(optimizer.optimizer) if p.grad is not None]
        if clip_val is not None:
            torch.nn.utils.clip_grad_value_(params, clip_val)
            return None
        assert max_norm is not None
        # With a gradient scaler, overflowing fp16 gradients are expected: the scaler skips that step.
        strict = error_if_nonfinite and amp.grad_scaler is None
        return self._strategy.clip_grad_norm(params, max_norm, norm_type, strict)

    def autocast(self) -> AbstractContextManager[Any]:
        """The precision context for code that runs outside the model's forward pass."""
        return self._strategy.amp.forward_context()

    def no_backward_sync(self, module: Any, enabled: bool = True) -> AbstractContextManager[Any]:
        """Skip the gradient all-reduce in backward passes inside this context (gradient accumulation).

        Raises:
            TypeError: ``module`` was not set up by Fabric.
        """
        validation.require_set_up(module, _FabricModule, "no_backward_sync")
        return self._strategy.no_backward_sync(module._forward_module, enabled)

    # --- devices and creation -------------------------------------------------------------------
    def to_device(self, obj: Any) -> Any:
        """Move a module, a tensor or a collection of tensors to this process's device."""
        if isinstance(obj, torch.nn.Module):
            self._strategy.module_to_device(obj)
            return obj
        return move_data_to_device(obj, self.device)

    def init_tensor(self) -> AbstractContextManager[Any]:
        """Create tensors directly on the device, in the precision's dtype."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.device)
        stack.enter_context(self._strategy.amp.tensor_init_context())
        return stack

    def init_module(self, empty_init: bool | None = None) -> AbstractContextManager[Any]:
        """Create a model directly on the device, in the precision's dtype.

        Args:
            empty_init: Skip the weight initialisation (for weights loaded right after).
        """
        self._ensure_running()
        stack = contextlib.ExitStack()
        stack.enter_context(self.device)
        stack.enter_context(self._strategy.amp.module_init_context())
        if empty_init:
            stack.enter_context(self._strategy.module_init_context(empty_init=True))
        return stack

    # --- communication --------------------------------------------------------------------------
    def barrier(self, name: str | None = None) -> None:
        """Wait until every process reaches this call."""
        self._ensure_running()
        self._strategy.barrier(name)

    def all_reduce(self, data: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        """Reduce tensors (or numbers, or collections of them) across processes, in place.

        Every tensor on this process's device is reduced in place and returned, so
        ``fabric.all_reduce(loss)`` alone updates ``loss``; a tensor elsewhere is reduced as a copy
        moved to the device (yours is left as it was), as in Lightning. A mean divides in place:
        an integer tensor keeps its dtype and gets the mean truncated toward zero. Python numbers
        and NumPy arrays anywhere in ``data`` are first turned into tensors on the device
        (``bool`` to ``uint8``, ``int`` to ``int32``, ``float`` to ``float32``) and come back as
        tensors. Every process must call it with the same shapes.

        Args:
            data: A tensor, number or array, or a (nested) collection of them.
            group: The process group; all processes by default.
            reduce_op: ``"mean"``, ``"sum"``, ``"max"``, ``"min"``, ``"product"`` or a ``ReduceOp``.

        Returns:
            ``data`` with every tensor reduced (the same tensor objects) and every number or array
            converted to a reduced tensor.

        Example::

            total = fabric.all_reduce({"loss_sum": loss_sum, "num_samples": len(batch)}, reduce_op="sum")
            mean_loss = total["loss_sum"] / total["num_samples"]
        """
        self._ensure_running()
        tensors = self._as_tensors(data)
        return apply_to_tensors(tensors, lambda t: self._strategy.all_reduce(t, reduce_op, group))

    def all_gather(self, data: Any, group: Any = None, sync_grads: bool = False) -> Any:
        """Gather tensors from every process, stacked along a new first dimension.

        Ranks may send tensors of different shapes: then each tensor becomes a list of the ranks'
        tensors instead of one stacked tensor. With one process no dimension is added. Python
        numbers and NumPy arrays are turned into tensors first, as in :meth:`all_reduce`.
        """
        self._ensure_running()
        tensors = self._as_tensors(data)
        if sync_grads and self.world_size > 1:
            import torch.distributed.nn.functional as differentiable

            gather: Callable[..., Any] = differentiable.all_gather
            return apply_to_tensors(tensors, lambda t: torch.stack(gather(t, group=group)))
        return apply_to_tensors(tensors, lambda t: self._strategy.all_gather(t, group))

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Send ``obj`` from rank ``src`` to all processes; tensors travel without pickling."""
        self._ensure_running()
        return self._strategy.broadcast(obj, src)

    def preemption_requested(self, *, grace: float | None = preemption.DEFAULT_GRACE_S) -> bool:
        """Return True, on every rank, once any rank has received a preemption signal.

        The signals are SIGTERM and, under Slurm, ``SLURMEnvironment.requeue_signal`` (SIGUSR1 by
        default; ask Slurm for it with ``#SBATCH --signal=USR1@90``). The first call installs the
        handlers, so a script that never asks keeps the default behaviour. With several processes
        the ranks agree with one all-reduce of a one-element CPU tensor (over gloo; beside NCCL, on a
        gloo group of its own, so polling never waits for the GPU), so every rank must call this at
        the same point of the loop, like :meth:`barrier`; with one process no collective runs.

        If the loop has not seen the request ``grace`` seconds after the signal (a rank blocked in a
        collective never polls), the process is ended the way the signal would have ended it; a
        second copy of the signal ends it at once. Under Slurm with
        ``SLURMEnvironment(auto_requeue=True)``, global rank 0 runs ``scontrol requeue`` when the
        process exits after the loop stopped. See :mod:`handloom.preemption`.

        Args:
            grace: Seconds the loop has, from the signal, to see the request; ``None`` never ends
                the process. Read by the first call; later calls must pass the same value.

        Raises:
            ValueError: ``grace`` is not a positive number of seconds or ``None``, or differs from
                the first call's.
            RuntimeError: The first call is made from a thread other than the main thread.

        Example::

            for step in range(start, num_steps):
                ...
                if fabric.preemption_requested():
                    fabric.save(folder.path(step), state)
                    break
        """
        self._ensure_running()
        grace_s = preemption.check_grace(grace, "fabric.preemption_requested")
        watcher = self._preemption
        if watcher is None or watcher.grace != grace_s:  # a changed grace is refused by the install
            plan = preemption.resolve_preemption(self._plan.environment, self.global_rank, os.environ)
            watcher = preemption.install_preemption_handlers(
                plan.signals,
                grace=grace_s,
                requeue_job_id=plan.requeue_job_id,
                # A background save lands (or its failure ends the process with status 1) before the requeue.
                before_requeue=self._checkpoints.wait_at_exit,
            )
            self._preemption = watcher
        requested = self._strategy.any_rank(watcher.received is not None, "fabric.preemption_requested()")
        if requested:
            watcher.acknowledge()
        return requested

    def _as_tensors(self, data: Any) -> Any:
        return convert_to_tensors(data, self.device)

    @contextlib.contextmanager
    def rank_zero_first(self, local: bool = False) -> Generator[None, None, None]:
        """Let rank 0 (of the job, or of each node with ``local=True``) run the block before the others."""
        self._ensure_running()
        first = (self.local_rank if local else self.global_rank) == 0
        if not first:
            self.barrier()
        yield
        if first:
            self.barrier()

    # --- output, hooks, logging -----------------------------------------------------------------
    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on global rank 0 only."""
        if self.global_rank == 0:
            print(*args, **kwargs)

    @staticmethod
    def seed_everything(
        seed: SupportsInt | str | None = None, workers: bool | None = None, verbose: bool = True
    ) -> int:
        """Seed Python, NumPy (if installed) and torch; with ``workers`` (default True), seed dataloader
        workers distinctly per rank and worker. ``seed`` may be anything ``int()`` converts, such as
        ``"42"`` (see :func:`handloom.seed_everything`)."""
        from handloom.seed import seed_everything

        return seed_everything(seed, workers=True if workers is None else workers, verbose=verbose)

    def call(self, hook_name: str, *args: Any, **kwargs: Any) -> None:
        """Call ``hook_name`` on every callback that defines it, in the order the callbacks were given.

        Callbacks without the method, or with the attribute set to ``None``, are skipped. Keyword
        arguments the method does not accept are left out (unless it takes ``**kwargs``). Built-in
        calls: ``on_after_setup(fabric, module)`` from ``setup``/``setup_module`` and
        ``on_after_optimizer_step(strategy, optimizer)`` after each optimizer step.

        Raises:
            TypeError: A callback's attribute named ``hook_name`` is not callable.

        Example::

            class PrintLoss:
                def on_train_batch_end(self, loss, batch_idx):
                    print(batch_idx, loss.item())

            fabric = Fabric(callbacks=[PrintLoss()])
            fabric.call("on_train_batch_end", loss=loss, batch_idx=i, outputs=out)  # outputs left out
        """
        for callback in self._callbacks:
            method = getattr(callback, hook_name, None)
            if method is None:
                continue
            if not callable(method):
                raise TypeError(
                    f"fabric.call({hook_name!r}) found {type(callback).__name__}.{hook_name} ="
                    f" {method!r}, which is not a method. Define it as a method, or set it to None to"
                    " skip this callback."
                )
            method(*args, **validation.accepted_kwargs(method, kwargs))

    def log(self, name: str, value: Any, step: int | None = None) -> None:
        """Log one metric to every logger; see :meth:`log_dict`.

        Raises:
            ValueError: ``value`` is a tensor with more than one element.
        """
        self.log_dict({name: value}, step=step)

    def log_dict(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log several metrics (numbers or one-element tensors) to every logger.

        Values are not reduced across processes; handloom's loggers write on global rank 0 only.
        They keep tensors on the device until they flush (one sync per flush, not per call);
        loggers of other libraries get Python numbers.

        Raises:
            ValueError: A tensor with more than one element (the message names its key).

        Example::

            fabric.log_dict({"loss": loss, "lr": scheduler.get_last_lr()[0]}, step=step)
        """
        if not self._loggers:
            return
        _loggers.check_metrics(metrics)
        _loggers.log_to_all(self._loggers, metrics, step)

    def _finalize_loggers(self, status: str) -> None:
        """Write everything the loggers hold and close their files (``finalize(status)`` on each)."""
        from handloom.loggers.base import finalize_all

        finalize_all(self._loggers, status)

    # --- checkpoints ----------------------------------------------------------------------------
    def save(
        self,
        path: str | os.PathLike[str],
        state: dict[str, Any],
        filter: Any = None,
        *,
        resume_state: bool | None = None,
        async_save: bool = False,
    ) -> None:
        """Save ``state`` (modules, optimizers, other stateful objects, plain values).

        Every process must call it, as in Lightning: it returns once the checkpoint is complete,
        so a ``fabric.load`` right after reads it. A call from only some processes raises within
        ``save_timeout`` (15 s) naming the ranks that did not call it, and so do processes that
        pass different paths. Single device and DDP write one file (global rank 0 writes it);
        sharded strategies write a directory of shards, staged and committed, that loads on any
        number of processes (``state_dict_type="full"`` writes one file for ``torch.load``).

        The file holds exactly the keys of ``state``: stateful objects as their ``state_dict()``,
        other values as given. To resume mid-epoch exactly, put the set-up dataloader and a
        :class:`handloom.checkpoint.RandomState` in ``state``: every rank's loader position and
        random states are recorded under their keys.

        Args:
            path: The checkpoint file (or directory, for sharded checkpoints).
            state: What to save.
            filter: Per-key functions ``(name, value) -> bool`` selecting entries of a state dict.
            resume_state: Deprecated and ignored; a checkpoint records loader positions and random
                states only for the loaders and ``RandomState`` values in ``state``.
            async_save: Return once the state is copied to host memory and write in the background.
                One save is in flight at a time; a failure is raised by the next save or load, when a
                launched worker returns, or at exit (status 1).

        Raises:
            TypeError: ``state`` is not a dict, or ``filter`` is not a dict of functions.
            ValueError: ``filter`` names a missing key.
            RuntimeError: Not every process called it, or they passed different paths.
            handloom.checkpoint.CheckpointSaveError: The previous background save failed.

        Example::

            state = {"model": model, "optimizer": optimizer, "loader": loader, "rng": RandomState()}
            fabric.save("checkpoints/step-100.ckpt", state)
        """
        self._checkpoints.save(
            path, state, filter, self._set_up_modules(), resume_state=resume_state, async_save=async_save
        )

    def _set_up_modules(self) -> list[torch.nn.Module]:
        return [obj for obj in list(self._setup_objects) if isinstance(obj, torch.nn.Module)]

    def load(
        self,
        path: str | os.PathLike[str],
        state: dict[str, Any] | None = None,
        strict: bool = True,
        *,
        resume_state: bool | None = None,
        weights_only: bool = True,
    ) -> Any:
        """Restore the objects in ``state`` in place; return what the checkpoint holds beyond them.

        With ``state=None`` the whole checkpoint is returned. Files and sharded directories load
        under any strategy; a sharded checkpoint is resharded to this job's number of processes.
        Only what ``state`` holds is restored: a set-up dataloader in ``state`` continues where
        the saved one stopped (this rank's position), a :class:`handloom.checkpoint.RandomState`
        restores this rank's random states; loaders not in ``state`` are left alone.

        Args:
            path: A checkpoint file or sharded directory.
            state: The objects to restore, by the keys they were saved under.
            strict: Every key of ``state`` must be in the checkpoint, and module keys must match.
            resume_state: Deprecated: ``False`` skips restoring the dataloaders and ``RandomState``
                values in ``state``; leave them out of ``state`` instead.
            weights_only: Read with ``torch.load(weights_only=True)``, which refuses arbitrary
                pickled objects. For a checkpoint you trust that holds such objects, register their
                classes with ``torch.serialization.add_safe_globals`` or pass ``False``.

        Example::

            state = {"model": model, "optimizer": optimizer, "step": 0}
            fabric.load("checkpoints/step-100.ckpt", state)  # state["step"] is the saved step
        """
        return self._checkpoints.load(
            path, state, strict, self._set_up_modules(), resume_state=resume_state, weights_only=weights_only
        )

    def load_raw(
        self, path: str | os.PathLike[str], obj: Any, strict: bool = True, *, weights_only: bool = True
    ) -> None:
        """Load a plain ``state_dict`` file (``torch.save(model.state_dict())``) into ``obj``."""
        target = obj.module if isinstance(obj, _FabricModule) else obj
        validation.check_load_raw_target(target)
        data = self._strategy._read_file(path, weights_only, mmap=True)  # through a CheckpointIO plugin
        validation.check_raw_state(path, target, data)
        if isinstance(target, torch.nn.Module) and _is_sharded(target):
            from handloom.wrappers import load_full_state_dict

            load_full_state_dict(target, data, strict)
        elif isinstance(target, torch.nn.Module):
            target.load_state_dict(data, strict=strict)
        else:
            target.load_state_dict(data)


def _run_then_finalize_loggers(
    function: Callable[..., Any], fabric: Fabric, *args: Any, **kwargs: Any
) -> Any:
    """Run a launched worker function, then finalise the loggers (workers skip atexit hooks)."""
    try:
        result = function(fabric, *args, **kwargs)
        fabric._checkpoints.wait()  # a background save must land before the worker exits
    except BaseException:
        fabric._finalize_loggers("failed")
        raise
    fabric._finalize_loggers("success")
    return result


def _is_sharded(module: torch.nn.Module) -> bool:
    """True when some parameter of ``module`` is a DTensor (FSDP2 or tensor parallel)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())
