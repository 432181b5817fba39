"""Optimizers over sharded models: re-pointing them at the shards, and portable state-dict keys.

``torch.optim`` state dicts name parameters by position (0, 1, ...); the state-dict API of
``torch.distributed.checkpoint`` names them by their path in the model (``"layers.0.weight"``).
Full checkpoints are written by position, so plain ``optimizer.load_state_dict`` reads them.
"""

from __future__ import annotations

from typing import Any

import torch


def parameter_names(module: torch.nn.Module) -> dict[int, str]:
    """Map ``id(parameter)`` to its path in ``module`` (tied parameters get their first name)."""
    return {id(param): name for name, param in module.named_parameters()}


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters in the order its state dict numbers them."""
    return [param for group in optimizer.param_groups for param in group["params"]]


def repoint_optimizer(
    optimizer: torch.optim.Optimizer, names_before: dict[int, str], module: torch.nn.Module, owner: str
) -> None:
    """Replace each parameter ``optimizer`` holds by the sharded ``module``'s parameter of the same name.

    The lists in ``param_groups`` are changed in place, so optimizers that keep a reference to them
    (LBFGS) see the new parameters.

    Raises:
        RuntimeError: The optimizer has stepped already (its state is tied to the old parameters).
        ValueError: The optimizer holds a parameter that is not in ``module``.
    """
    name = type(optimizer).__name__
    if optimizer.state:
        raise RuntimeError(
            f"fabric.setup(model, {name}) under {owner}: the optimizer has taken steps already, and its"
            " state belongs to the unsharded parameters. Set up the model and optimizer before training:"
            " model = fabric.setup_module(model); optimizer = fabric.setup_optimizers(make_optimizer(model))."
        )
    current = dict(module.named_parameters())
    for group in optimizer.param_groups:
        params = group["params"]
        for index, param in enumerate(params):
            path = names_before.get(id(param))
            if path is None or path not in current:
                raise ValueError(
                    f"fabric.setup(model, {name}) under {owner}: the optimizer holds a parameter of shape"
                    f" {tuple(param.shape)} that is not in the model being set up. Pass each optimizer with"
                    " the model whose parameters it updates: fabric.setup(model, optimizer)."
                )
            params[index] = current[path]


def to_name_keyed(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, module: torch.nn.Module
) -> dict[str, Any]:
    """Convert a position-keyed optimizer state dict to the path-keyed form DCP uses."""
    names = parameter_names(module)
    order = [names[id(p)] for p in optimizer_parameters(optimizer)]
    groups = []
    for group in state["param_groups"]:
        groups.append({**group, "params": [order[i] for i in group["params"]]})
    return {"state": {order[int(i)]: value for i, value in state["state"].items()}, "param_groups": groups}


def to_position_keyed(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, module: torch.nn.Module
) -> dict[str, Any]:
    """Convert a path-keyed optimizer state dict to ``torch.optim``'s position-keyed form."""
    names = parameter_names(module)
    position = {names[id(p)]: i for i, p in enumerate(optimizer_parameters(optimizer))}
    groups = []
    for group in state["param_groups"]:
        groups.append({**group, "params": [position[n] for n in group["params"]]})
    return {"state": {position[n]: value for n, value in state["state"].items()}, "param_groups": groups}


def is_name_keyed(state: dict[str, Any]) -> bool:
    """True when the optimizer state dict names parameters by path."""
    groups = state.get("param_groups") or []
    for group in groups:
        for key in group.get("params", []):
            return isinstance(key, str)
    return any(isinstance(key, str) for key in state.get("state", {}))
