"""The one place that turns Fabric's constructor arguments into a plan.

:func:`resolve_plan` is pure: it takes the arguments, the launch environment as a plain mapping
and a :class:`~handloom.devices.HardwareProbe`, and returns a :class:`Plan`. It only decides what
the user left as ``"auto"``; every explicit choice is honoured or rejected with a clear error.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from handloom import _env_names as names
from handloom.accelerators import Accelerator
from handloom.accelerators.choice import check_given_checkpoint_io, given_environment, resolve_hardware
from handloom.devices import AcceleratorName, DevicesInput, HardwareProbe, parse_devices
from handloom.environments import ClusterEnvironment, LocalEnvironment, Topology, join_job, read_topology
from handloom.plugins.io import CheckpointIO
from handloom.plugins.precision.precision import Precision
from handloom.precision import (
    PRECISION_NAMES,
    PrecisionPolicy,
    build_precision_policy,
    resolve_precision_name,
)
from handloom.strategies.base import Strategy
from handloom.strategies.registry import build_strategy, strategy_names

LaunchMode = Literal["none", "script", "spawn", "fork", "external"]

_DEFAULTS: dict[str, object] = {
    "accelerator": "auto",
    "strategy": "auto",
    "devices": "auto",
    "num_nodes": 1,
    "precision": None,
}


@dataclass(frozen=True)
class FabricOptions:
    """The constructor arguments of :class:`~handloom.Fabric`, as the user wrote them."""

    accelerator: str | Any = "auto"
    strategy: str | Strategy = "auto"
    devices: DevicesInput = "auto"
    num_nodes: int = 1
    precision: str | int | Precision | None = None
    plugins: Sequence[object] = field(default_factory=tuple)


@dataclass(frozen=True)
class Plan:
    """Everything Fabric needs to know before it starts processes or touches a model.

    Attributes:
        accelerator: The concrete accelerator.
        device_indices: Device indices used on each node (``0..n-1`` on the CPU).
        num_nodes: Number of nodes.
        precision: The precision policy.
        strategy: The strategy instance (built here from a name, or the user's own instance).
        launch: How processes come to exist: ``"none"`` (one process), ``"script"`` (re-run the
            script per local rank), ``"spawn"``/``"fork"`` (start a function per local rank), or
            ``"external"`` (a launcher such as torchrun, srun or ``handloom run`` already did).
        environment: The cluster environment that was detected or given.
        topology: What the environment says about this process.
        cli_used: True when the script runs under ``handloom run``.
        accelerator_object: The :class:`~handloom.accelerators.Accelerator` instance in use
            (``fabric.accelerator``).
    """

    accelerator: AcceleratorName
    device_indices: tuple[int, ...]
    num_nodes: int
    precision: PrecisionPolicy
    strategy: Strategy
    launch: LaunchMode
    environment: ClusterEnvironment
    topology: Topology
    cli_used: bool
    accelerator_object: Accelerator | None = None

    @property
    def num_processes(self) -> int:
        """Processes per node."""
        return len(self.device_indices)

    @property
    def world_size(self) -> int:
        """Processes in the whole job."""
        return self.num_processes * self.num_nodes


def _merge_cli(options: FabricOptions, env: Mapping[str, str]) -> dict[str, Any]:
    """Take the CLI's value for each option the script left at its default; reject conflicts."""
    values: dict[str, Any] = {
        "accelerator": options.accelerator,
        "strategy": options.strategy,
        "devices": options.devices,
        "num_nodes": options.num_nodes,
        "precision": options.precision,
    }
    if env.get(names.CLI_USED) != "1":
        return values
    for option, var in names.CLI_OPTION_VARS.items():
        cli_value = env.get(var)
        if cli_value is None:
            continue
        mine = values[option]
        flag = "--" + option.replace("_", "-")
        if mine == _DEFAULTS[option]:
            values[option] = int(cli_value) if option == "num_nodes" else cli_value
            continue
        if _same_choice(option, mine, cli_value):
            continue  # the script's own spelling (an Accelerator or Strategy instance) is kept
        raise ValueError(
            f"Fabric({option}={mine!r}) conflicts with `{flag}={cli_value}` given to `handloom run`."
            f" Remove the argument from Fabric(...) or change {flag} so the two agree."
        )
    return values


def _same_choice(option: str, mine: object, cli_value: str) -> bool:
    if isinstance(mine, Strategy):
        return cli_value == "auto"
    if isinstance(mine, Accelerator):
        return cli_value in ("auto", mine.name())
    if isinstance(mine, Precision):
        return cli_value == mine.precision
    if option == "precision":
        try:
            return resolve_precision_name(mine) == resolve_precision_name(cli_value)
        except ValueError:
            return False
    if isinstance(mine, (list, tuple)):
        return ",".join(str(i) for i in mine) == cli_value.strip(",")
    return str(mine).lower() == cli_value.lower()


def _split_plugins(
    plugins: Sequence[object] | object,
) -> tuple[ClusterEnvironment | None, CheckpointIO | None]:
    """The cluster environment and the checkpoint I/O plugin in ``plugins`` (each optional).

    Precision plugins are read by :func:`_precision_choice`.

    Raises:
        TypeError: A plugin of another kind.
        ValueError: Two plugins of one kind.
    """
    items = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins] if plugins is not None else []
    others = [p for p in items if not isinstance(p, (ClusterEnvironment, CheckpointIO, Precision))]
    if others:
        raise TypeError(
            f"Fabric(plugins=[{type(others[0]).__name__}(...)]) is not a plugin handloom understands."
            " Pass a ClusterEnvironment from handloom.environments; set precision with precision=... or a"
            " Precision plugin, and checkpoint storage with a CheckpointIO (both from handloom.plugins)."
        )
    chosen: list[Any] = []
    for kind, label in ((ClusterEnvironment, "cluster environments"), (CheckpointIO, "CheckpointIO plugins")):
        found = [p for p in items if isinstance(p, kind)]
        if len(found) > 1:
            held = ", ".join(f"{type(p).__name__}()" for p in found)
            raise ValueError(
                f"Fabric(plugins=...) holds {len(found)} {label} ({held}). Fabric uses one plugin of"
                f" each kind. Pass at most one {kind.__name__}."
            )
        chosen.append(found[0] if found else None)
    return chosen[0], chosen[1]


def _precision_choice(value: object, plugins: Sequence[object]) -> tuple[PrecisionPolicy, Precision | None]:
    """The precision policy and the user's plugin, from ``precision=`` and ``plugins=``."""
    chosen = [p for p in plugins if isinstance(p, Precision)]
    if isinstance(value, Precision):
        chosen.insert(0, value)
    elif value is not None and chosen:
        raise ValueError(
            f"Fabric(precision={value!r}) and the precision plugin {type(chosen[0]).__name__} in"
            " plugins=[...] both set the precision. Pass only one of them."
        )
    if len(chosen) > 1:
        kinds = ", ".join(type(p).__name__ for p in chosen)
        raise ValueError(
            f"Fabric(...) received {len(chosen)} precision plugins ({kinds}). Pass exactly one,"
            " in precision= or in plugins=[...]."
        )
    if not chosen:
        return build_precision_policy(resolve_precision_name(value)), None
    plugin = chosen[0]
    name = plugin.precision if plugin.precision in PRECISION_NAMES else "32-true"
    return build_precision_policy(name), plugin  # type: ignore[arg-type]


def _check_num_nodes(num_nodes: object) -> int:
    message = (
        f"Fabric(num_nodes={num_nodes!r}) must be an integer of at least 1."
        " Pass the number of machines in the job, for example num_nodes=2."
    )
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int):
        raise TypeError(message)
    if num_nodes < 1:
        raise ValueError(message)
    return num_nodes


def resolve_plan(options: FabricOptions, env: Mapping[str, str], probe: HardwareProbe) -> Plan:
    """Resolve the user's options against the launch environment and the hardware.

    Args:
        options: The constructor arguments.
        env: The process environment (a plain mapping; tests pass dicts).
        probe: What the hardware offers.

    Returns:
        The resolved :class:`Plan`.

    Raises:
        ValueError: An unknown or unavailable choice, or a choice that contradicts the launcher.
        TypeError: An argument of the wrong type.
    """
    values = _merge_cli(options, env)
    num_nodes = _check_num_nodes(values["num_nodes"])
    precision, precision_plugin = _precision_choice(values["precision"], options.plugins)
    hardware = resolve_hardware(values["accelerator"], values["strategy"], values["devices"], probe)
    accelerator = hardware.accelerator
    explicit_environment, checkpoint_io = _split_plugins(options.plugins)
    explicit_environment = given_environment(explicit_environment, values["strategy"])
    check_given_checkpoint_io(options.plugins, values["strategy"])
    environment, topology = read_topology(env, explicit_environment)

    devices_value: DevicesInput = values["devices"]
    external = topology.creates_processes_externally
    if external and devices_value == "auto":
        local = topology.local_world_size or max(1, topology.world_size // num_nodes)
        devices_value = local if accelerator != "cuda" else list(range(local))
    device_indices = hardware.device_indices or tuple(
        parse_devices(devices_value, accelerator, probe, interactive=probe.interactive)
    )

    world_size = len(device_indices) * num_nodes
    strategy = _resolve_strategy(values["strategy"], accelerator, world_size, probe)
    precision = _precision_for_strategy(precision, precision_plugin, strategy, accelerator)
    if precision_plugin is not None:
        if strategy._chosen_precision not in (None, precision_plugin):
            raise ValueError(
                f"Fabric(plugins=[{type(precision_plugin).__name__}(...)]) conflicts with the precision"
                f" plugin {type(strategy._chosen_precision).__name__} of {type(strategy).__name__}(...)."
                " Pass the precision in one place only."
            )
        strategy.precision = precision_plugin
    elif strategy._chosen_precision is not None:
        precision, _ = _precision_choice(strategy._chosen_precision, ())
    else:  # the plugin the name stands for, known before launch as in Lightning
        strategy._named_precision = strategy.precision_plugin_for(precision, accelerator)
    # Devices fixed by the strategy (SingleDeviceStrategy(device=...)) are asked for as devices=... is.
    asked = values["devices"] if hardware.device_indices is None else list(hardware.device_indices)
    if external and _is_standalone(topology, asked, world_size, strategy):
        # A one-device Fabric made inside a running job (e.g. on rank 0 after training) stands
        # alone, as under Lightning: what a process started by hand gets, not reading the job's
        # variables (rank 0 of its own, no process group joined).
        environment, external = LocalEnvironment(), False
        topology = environment.topology({})
    launch = _resolve_launch(strategy, external, world_size, probe)
    if external:
        topology = join_job(environment, topology, env, len(device_indices), num_nodes, values["devices"])
    if checkpoint_io is not None:
        strategy.checkpoint_io = checkpoint_io  # sharded strategies refuse it (NotImplementedError)
    strategy.plan_processes(world_size if strategy.is_distributed else 1)
    return Plan(
        accelerator=accelerator,
        device_indices=device_indices,
        num_nodes=num_nodes,
        precision=precision,
        strategy=strategy,
        launch=launch,
        environment=environment,
        topology=topology,
        cli_used=env.get(names.CLI_USED) == "1",
        accelerator_object=hardware.accelerator_object,
    )


def _precision_for_strategy(
    precision: PrecisionPolicy, plugin: Precision | None, strategy: Strategy, accelerator: AcceleratorName
) -> PrecisionPolicy:
    """Apply the strategy's precision rules to a precision given by name (a plugin is used as it is)."""
    if plugin is not None:
        return precision
    allowed = strategy.supported_precisions
    if allowed is not None and precision.name not in allowed:
        raise ValueError(
            f"Fabric(strategy={strategy.name!r}, precision={precision.name!r}): {type(strategy).__name__}"
            f" does not support this precision. Choose one of: {', '.join(repr(p) for p in allowed)}."
        )
    if precision.name == "16-mixed" and accelerator == "cpu" and strategy.fp16_mixed_falls_back_on_cpu:
        # As in Lightning: fp16 autocast on the CPU becomes bf16 (a MixedPrecision("16-mixed", "cpu")
        # plugin still gives fp16 with a gradient scaler).
        warnings.warn(
            "Fabric(accelerator='cpu', precision='16-mixed'): float16 autocast is not supported on the CPU,"
            " so precision='bf16-mixed' is used instead. For float16 with a gradient scaler on the CPU, pass"
            " plugins=[MixedPrecision('16-mixed', 'cpu')].",
            UserWarning,
            stacklevel=4,
        )
        return build_precision_policy("bf16-mixed")
    return precision


def _resolve_strategy(
    value: object, accelerator: AcceleratorName, world_size: int, probe: HardwareProbe
) -> Strategy:
    if isinstance(value, Strategy):
        strategy = value
    elif isinstance(value, str):
        name = value.lower()
        if name == "auto":
            if world_size == 1:
                name = "single_device"
            else:
                name = "ddp_fork" if probe.interactive and probe.fork_available else "ddp"
        if name not in strategy_names():
            choices = ", ".join(repr(n) for n in strategy_names(runnable_only=True))
            raise ValueError(f"Fabric(strategy={value!r}) is not a known strategy. Choose one of: {choices}.")
        strategy = build_strategy(name)
    else:
        raise TypeError(
            f"Fabric(strategy={value!r}) must be a strategy name such as 'ddp' or a Strategy instance"
            " from handloom.strategies."
        )
    strategy.check_compatible(accelerator=accelerator, world_size=world_size, probe=probe)
    return strategy


def _resolve_launch(strategy: Strategy, external: bool, world_size: int, probe: HardwareProbe) -> LaunchMode:
    if external:
        return "external"
    if world_size == 1 or not strategy.is_distributed:
        return "none"
    method = strategy.start_method
    if method == "popen":
        if probe.interactive:
            raise ValueError(
                f"Fabric(strategy={strategy.name!r}) re-runs the script once per process, which a notebook"
                " or interactive session cannot do. Use strategy='ddp_notebook' and fabric.launch(fn)."
            )
        return "script"
    if method == "fork" and not probe.fork_available:
        raise ValueError(
            f"Fabric(strategy={strategy.name!r}) needs the 'fork' start method, which this platform lacks."
            " Use strategy='ddp_spawn' instead."
        )
    return "fork" if method == "fork" else "spawn"


def _is_standalone(topology: Topology, devices: object, world_size: int, strategy: Strategy) -> bool:
    """True when the user asked for one process in all (``devices=1``, one node, a one-process
    strategy) inside a job that a launcher started with several."""
    asked = devices != "auto"  # "auto" follows the launcher; a count that differs is an error there
    return asked and world_size == 1 and topology.world_size > 1 and not strategy.is_distributed
