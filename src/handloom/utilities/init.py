"""Module initialisation helpers under the names of ``lightning.fabric.utilities.init``.

Programs written for Lightning (litgpt among them) import these private names directly. Skipping
``torch.nn.init`` is :mod:`handloom.init`'s mode; finding meta tensors is
:func:`handloom.sharding.materialize.has_meta_tensors`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from handloom.init import _SkipInit
from handloom.sharding.materialize import has_meta_tensors

__all__ = ["_EmptyInit", "_has_meta_device_parameters_or_buffers", "_materialize_meta_tensors"]


class _EmptyInit(_SkipInit):
    """Build modules without running ``torch.nn.init``: their memory stays uninitialised.

    Meant for a model whose weights are loaded right after it is built::

        with _EmptyInit():
            model = BigModel()
        model.load_state_dict(torch.load("checkpoint.pt"))

    Args:
        enabled: When false the context changes nothing.
    """

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        if not self.enabled:
            return func(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


def _has_meta_device_parameters_or_buffers(
    obj: torch.nn.Module | torch.optim.Optimizer, recurse: bool = True
) -> bool:
    """True when ``obj`` (a module, or an optimizer's parameters) holds a tensor on the meta device.

    Args:
        obj: A module, or an optimizer whose parameter groups are checked.
        recurse: For a module, whether its submodules count too.

    Raises:
        TypeError: ``obj`` is neither a module nor an optimizer.
    """
    if isinstance(obj, torch.optim.Optimizer):
        return any(
            isinstance(p, torch.nn.Parameter) and p.is_meta
            for group in obj.param_groups
            for p in group["params"]
        )
    if isinstance(obj, torch.nn.Module):
        if recurse:
            return has_meta_tensors(obj)
        return any(t.is_meta for t in obj.parameters(recurse=False)) or any(
            t.is_meta for t in obj.buffers(recurse=False)
        )
    raise TypeError(
        f"_has_meta_device_parameters_or_buffers({type(obj).__name__}) needs a module or an optimizer."
        f" A {type(obj).__name__} has neither parameters nor buffers. Pass a torch.nn.Module or a"
        " torch.optim.Optimizer."
    )


def _materialize_meta_tensors(module: torch.nn.Module, device: torch.device | str | int) -> None:
    """Give every submodule of ``module`` whose own tensors are on the meta device real ones on ``device``.

    Each such submodule gets uninitialised memory on ``device`` for its own parameters and buffers,
    then its ``reset_parameters()`` runs. Tensors already on a real device (loaded weights, say)
    are left as they are.

    Raises:
        TypeError: A submodule with meta tensors has no ``reset_parameters`` method.
    """
    for sub in module.modules():
        if not _has_meta_device_parameters_or_buffers(sub, recurse=False):
            continue
        sub.to_empty(device=device, recurse=False)
        reset = getattr(sub, "reset_parameters", None)
        if not callable(reset):
            raise TypeError(
                f"The {type(sub).__name__} submodule has tensors on the meta device but no"
                " reset_parameters() method, so they cannot be given values. Define"
                f" {type(sub).__name__}.reset_parameters(), or load weights into it before materialising."
            )
        reset()
