"""The one place that turns Fabric's constructor arguments into a plan.

:func:`resolve_plan` is pure: it takes the arguments, the launch environment as a plain mapping
and a :class:`~handloom.devices.HardwareProbe`, and returns a :class:`Plan`. It only decides what
the user left as ``"auto"``; every explicit choice is honoured or rejected with a clear error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from handloom import _env_names as names
from handloom.devices import AcceleratorName, DevicesInput, HardwareProbe, parse_devices, resolve_accelerator
from handloom.environments import ClusterEnvironment, LocalEnvironment, Topology, select_environment
from handloom.precision import PrecisionPolicy, build_precision_policy, resolve_precision_name
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
    precision: str | int | None = None
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
        if mine == _DEFAULTS[option] or _same_choice(option, mine, cli_value):
            values[option] = int(cli_value) if option == "num_nodes" else cli_value
            continue
        raise ValueError(
            f"Fabric({option}={mine!r}) conflicts with `{flag}={cli_value}` given to `handloom run`."
            f" Remove the argument from Fabric(...) or change {flag} so the two agree."
        )
    return values


def _same_choice(option: str, mine: object, cli_value: str) -> bool:
    if isinstance(mine, Strategy):
        return cli_value == "auto"
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
) -> ClusterEnvironment | None:
    items = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins] if plugins is not None else []
    environments = [p for p in items if isinstance(p, ClusterEnvironment)]
    others = [p for p in items if not isinstance(p, ClusterEnvironment)]
    if others:
        raise TypeError(
            f"Fabric(plugins=[{type(others[0]).__name__}(...)]) is not a plugin handloom understands."
            " Pass a ClusterEnvironment from handloom.environments; set precision with precision=..."
        )
    if len(environments) > 1:
        raise ValueError(
            f"Fabric(plugins=...) holds {len(environments)} cluster environments."
            " Pass at most one ClusterEnvironment."
        )
    return environments[0] if environments else None


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
    precision = build_precision_policy(resolve_precision_name(values["precision"]))
    accelerator_value = values["accelerator"]
    if not isinstance(accelerator_value, str):
        raise TypeError(
            f"Fabric(accelerator={accelerator_value!r}) must be a string."
            " Choose one of: 'cpu', 'cuda', 'gpu', 'mps', 'auto'."
        )
    accelerator = resolve_accelerator(accelerator_value, probe)
    environment = select_environment(env, _split_plugins(options.plugins))
    topology = environment.topology(env)

    devices_value: DevicesInput = values["devices"]
    external = topology.creates_processes_externally
    if external and devices_value == "auto":
        local = topology.local_world_size or max(1, topology.world_size // num_nodes)
        devices_value = local if accelerator != "cuda" else list(range(local))
    device_indices = tuple(parse_devices(devices_value, accelerator, probe, interactive=probe.interactive))

    world_size = len(device_indices) * num_nodes
    strategy = _resolve_strategy(values["strategy"], accelerator, world_size, probe)
    if external and _is_standalone(topology, values["devices"], world_size, strategy):
        # A one-device Fabric made inside a running job (e.g. on rank 0 after training) stands
        # alone, as under Lightning: what a process started by hand gets, not reading the job's
        # variables (rank 0 of its own, no process group joined).
        environment, external = LocalEnvironment(), False
        topology = environment.topology({})
    launch = _resolve_launch(strategy, external, world_size, probe)
    if external:
        _check_external_world(topology, len(device_indices), num_nodes, values["devices"])
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
    )


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
            choices = ", ".join(repr(n) for n in strategy_names())
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


def _check_external_world(topology: Topology, num_processes: int, num_nodes: int, devices: object) -> None:
    if num_processes * num_nodes == topology.world_size:
        return
    raise ValueError(
        f"Fabric(devices={devices!r}, num_nodes={num_nodes}) asks for {num_processes * num_nodes} processes,"
        f" but the {topology.name} launcher started {topology.world_size}."
        f" Make devices x num_nodes equal the launcher's process count ({topology.world_size}),"
        " or leave devices='auto'."
    )
