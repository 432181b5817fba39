"""What Fabric's hardware arguments given as objects decide, for the option resolver.

``Fabric(accelerator=...)`` may be a name or an :class:`Accelerator`; a strategy instance may
carry Lightning's ``accelerator``, ``parallel_devices`` (or a single device's ``device``) and
``cluster_environment``. :func:`resolve_hardware` turns them into the accelerator and, when an
object fixes them, the device indices; a choice made in two places that disagree is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from handloom.accelerators.accelerator import Accelerator
from handloom.accelerators.cpu import CPUAccelerator
from handloom.accelerators.cuda import CUDAAccelerator
from handloom.accelerators.mps import MPSAccelerator
from handloom.devices import AcceleratorName, HardwareProbe, parse_devices, resolve_accelerator

if TYPE_CHECKING:
    from handloom.environments import ClusterEnvironment

_KNOWN: tuple[tuple[type[Accelerator], AcceleratorName], ...] = (
    (CPUAccelerator, "cpu"),
    (CUDAAccelerator, "cuda"),
    (MPSAccelerator, "mps"),
)
_DEVICE_TYPES: tuple[AcceleratorName, ...] = ("cpu", "cuda", "mps")


@dataclass(frozen=True, slots=True)
class HardwareChoice:
    """The resolved accelerator, and the device indices when an object fixed them.

    Attributes:
        accelerator: The device type: ``"cpu"``, ``"cuda"`` or ``"mps"``.
        accelerator_object: The :class:`Accelerator` instance (``fabric.accelerator``).
        device_indices: This node's device indices when ``parallel_devices``, a single device's
            ``device`` or a custom accelerator chose them; ``None`` when ``devices`` decides.
    """

    accelerator: AcceleratorName
    accelerator_object: Accelerator
    device_indices: tuple[int, ...] | None


def resolve_hardware(
    accelerator: object, strategy: object, devices: object, probe: HardwareProbe
) -> HardwareChoice:
    """Resolve ``Fabric(accelerator=...)`` together with what a strategy instance carries.

    Raises:
        ValueError: An unknown or unavailable accelerator, or an accelerator or device count
            given both to the strategy and to Fabric that disagree.
        TypeError: ``accelerator`` is neither a name nor an Accelerator instance.
    """
    owner = type(strategy).__name__
    given_accelerator: Accelerator | None = getattr(strategy, "_accelerator", None)
    if given_accelerator is not None:
        if accelerator != "auto":
            raise ValueError(
                f"Fabric(accelerator={_spell(accelerator)}) conflicts with {owner}(accelerator="
                f"{type(given_accelerator).__name__}()): the accelerator is set in two places."
                " Pass it to one of them only."
            )
        accelerator = given_accelerator
    given_devices = _strategy_devices(strategy)
    if given_devices is not None:
        accelerator = _check_given_devices(accelerator, devices, given_devices, owner)
    if isinstance(accelerator, str):
        name = resolve_accelerator(accelerator, probe)
        from handloom.accelerators import ACCELERATOR_REGISTRY

        accelerator_object: Accelerator = ACCELERATOR_REGISTRY.get(name)
    elif isinstance(accelerator, Accelerator):
        accelerator_object = accelerator
        known = _known_name(accelerator)
        if known is None:
            return _custom(accelerator, devices, given_devices, probe)
        name = resolve_accelerator(known, probe)
    else:
        raise TypeError(
            f"Fabric(accelerator={accelerator!r}) must be a string or an Accelerator instance."
            " Choose one of: 'cpu', 'cuda', 'gpu', 'mps', 'auto', or pass e.g. CUDAAccelerator()."
        )
    indices = None if given_devices is None else _indices(given_devices, name, probe)
    return HardwareChoice(name, accelerator_object, indices)


def given_environment(
    plugin_environment: ClusterEnvironment | None, strategy: object
) -> ClusterEnvironment | None:
    """The cluster environment to use: the one in ``plugins=`` or the strategy's, not both.

    Raises:
        ValueError: Both were given (different objects).
    """
    carried: ClusterEnvironment | None = getattr(strategy, "cluster_environment", None)
    if carried is None:
        return plugin_environment
    if plugin_environment is not None and plugin_environment is not carried:
        raise ValueError(
            f"Fabric(plugins=[{type(plugin_environment).__name__}(...)]) conflicts with"
            f" {type(strategy).__name__}(cluster_environment={type(carried).__name__}(...)):"
            " the cluster environment is set in two places. Pass it to one of them only."
        )
    return carried


def check_given_checkpoint_io(plugins: object, strategy: object) -> None:
    """Reject a ``CheckpointIO`` given both in ``plugins=`` and to the strategy's constructor.

    Raises:
        ValueError: Both were given (different objects).
    """
    carried = getattr(strategy, "_checkpoint_io", None)
    if carried is None:
        return
    from handloom.plugins.io import CheckpointIO

    items = plugins if isinstance(plugins, (list, tuple)) else [plugins]
    for plugin in items:
        if isinstance(plugin, CheckpointIO) and plugin is not carried:
            raise ValueError(
                f"Fabric(plugins=[{type(plugin).__name__}(...)]) conflicts with {type(strategy).__name__}"
                f"(checkpoint_io={type(carried).__name__}(...)): checkpoint I/O is set in two places."
                " Pass it to one of them only."
            )


def _spell(value: object) -> str:
    return f"{type(value).__name__}()" if isinstance(value, Accelerator) else repr(value)


def _known_name(accelerator: Accelerator) -> AcceleratorName | None:
    for cls, name in _KNOWN:
        if isinstance(accelerator, cls):
            return name
    return None


def _strategy_devices(strategy: object) -> list[torch.device] | None:
    """``parallel_devices`` of a parallel strategy, or ``[device]`` of a single-device one."""
    from handloom.strategies.parallel import ParallelStrategy
    from handloom.strategies.single_device import SingleDeviceStrategy

    if isinstance(strategy, ParallelStrategy):
        return strategy.parallel_devices
    if isinstance(strategy, SingleDeviceStrategy) and strategy.device is not None:
        return [strategy.device]
    devices: list[torch.device] | None = getattr(strategy, "parallel_devices", None)  # DataParallel
    return devices or None


def _check_given_devices(accelerator: Any, devices: object, given: list[torch.device], owner: str) -> Any:
    """The accelerator the strategy's devices imply, after checking Fabric's arguments agree."""
    kind = given[0].type
    listed = ", ".join(repr(str(d)) for d in given)
    if kind not in _DEVICE_TYPES:
        raise ValueError(
            f"{owner}(...) was given {kind} devices ({listed}), which handloom cannot run on."
            " Use 'cpu', 'cuda' or 'mps' devices."
        )
    if isinstance(accelerator, Accelerator):
        known = _known_name(accelerator)
        agrees = known is None or known == kind
    else:
        agrees = accelerator in ("auto", kind) or (accelerator == "gpu" and kind in ("cuda", "mps"))
    if not agrees:
        raise ValueError(
            f"Fabric(accelerator={_spell(accelerator)}) conflicts with the {kind} devices given to"
            f" {owner}(...) ({listed}). Leave accelerator='auto', or give the strategy {accelerator}"
            " devices."
        )
    if devices != "auto" and _count(devices) != len(given):
        raise ValueError(
            f"Fabric(devices={devices!r}) conflicts with the {len(given)} devices given to {owner}(...)"
            f" ({listed}). Leave devices='auto' or make the two agree."
        )
    return accelerator if isinstance(accelerator, Accelerator) else kind


def _count(devices: object) -> int | None:
    """How many processes a ``devices`` value asks for (``None`` when it cannot say without hardware)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([part for part in devices.strip("[]").split(",") if part.strip()])
    if isinstance(devices, (int, str)) and not isinstance(devices, bool):
        try:
            return int(devices)
        except ValueError:
            return None
    return None


def _indices(devices: list[torch.device], kind: AcceleratorName, probe: HardwareProbe) -> tuple[int, ...]:
    if kind == "cpu":
        return tuple(range(len(devices)))
    indices = [d.index if d.index is not None else 0 for d in devices]
    return tuple(parse_devices(indices, kind, probe))


def _custom(
    accelerator: Accelerator, devices: object, given: list[torch.device] | None, probe: HardwareProbe
) -> HardwareChoice:
    """A user's Accelerator subclass: its own methods pick the devices, which must be cpu/cuda/mps."""
    owner = f"Fabric(accelerator={type(accelerator).__name__}())"
    if not accelerator.is_available():
        raise ValueError(
            f"{owner} cannot run here: its is_available() returned False."
            " Use accelerator='auto', or run where that hardware is present."
        )
    if given is None:
        count = accelerator.auto_device_count() if devices == "auto" else devices
        chosen = accelerator.get_parallel_devices(accelerator.parse_devices(count))
        if (
            not isinstance(chosen, (list, tuple))
            or not chosen
            or not all(isinstance(d, torch.device) for d in chosen)
        ):
            raise TypeError(
                f"{owner}: get_parallel_devices() returned {chosen!r}, not a non-empty list of torch.device."
                " Return one torch.device per process from get_parallel_devices()."
            )
        given = list(chosen)
    kinds = sorted({d.type for d in given})
    if len(kinds) != 1 or kinds[0] not in _DEVICE_TYPES:
        raise ValueError(
            f"{owner} gives {', '.join(kinds)} devices, which handloom cannot run on."
            " A custom accelerator must return 'cpu', 'cuda' or 'mps' devices from get_parallel_devices()."
        )
    name = resolve_accelerator(kinds[0], probe)
    return HardwareChoice(name, accelerator, _indices(given, name, probe))
