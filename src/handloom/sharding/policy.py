"""Which submodules get their own ``fully_shard`` or activation checkpointing: policies as data.

A policy is given as a set of module classes, or as a callable. Callables may take the module
alone (``fn(module) -> bool``) or follow FSDP1's auto-wrap signature
(``fn(module, recurse, nonwrapped_numel) -> bool``, e.g. ``ModuleWrapPolicy`` or
``functools.partial(size_based_auto_wrap_policy, min_num_params=...)``), so policies written for
Lightning's FSDP strategy keep working.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ModulePolicy:
    """A resolved policy: ``select(module, nonwrapped_numel)`` says whether ``module`` is chosen.

    Attributes:
        classes: The module classes chosen (for a class-set policy).
        function: The user's callable (for a callable policy).
        fsdp1_style: True when ``function`` takes ``(module, recurse, nonwrapped_numel)``.
    """

    classes: tuple[type[torch.nn.Module], ...] = ()
    function: Callable[..., Any] | None = None
    fsdp1_style: bool = False

    def select(self, module: torch.nn.Module, nonwrapped_numel: int) -> bool:
        """True when the policy picks ``module``."""
        if self.function is None:
            return isinstance(module, self.classes)
        if self.fsdp1_style:
            return bool(self.function(module=module, recurse=False, nonwrapped_numel=nonwrapped_numel))
        return bool(self.function(module))


def _takes_recurse(function: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return "recurse" in parameters


def resolve_module_policy(value: object, *, owner: str, option: str) -> ModulePolicy | None:
    """Validate a policy as the user wrote it and return its resolved form.

    Args:
        value: ``None``, a module class, a set/list/tuple of module classes, or a callable.
        owner: The class name for error messages, e.g. ``"FSDPStrategy"``.
        option: The argument name for error messages, e.g. ``"auto_wrap_policy"``.

    Raises:
        TypeError: ``value`` is neither module classes nor a callable; the message names it.
    """
    if value is None:
        return None
    if isinstance(value, type) and issubclass(value, torch.nn.Module):
        return ModulePolicy(classes=(value,))
    if isinstance(value, (set, frozenset, list, tuple)):
        classes = tuple(value)
        bad = [c for c in classes if not (isinstance(c, type) and issubclass(c, torch.nn.Module))]
        if bad or not classes:
            what = f"{bad[0]!r} is not a torch.nn.Module subclass" if bad else "the set is empty"
            raise TypeError(
                f"{owner}({option}={value!r}): {what}. Pass a set of module classes such as"
                f" {{nn.TransformerDecoderLayer}}, or a function `module -> bool`."
            )
        return ModulePolicy(classes=classes)
    if callable(value):
        return ModulePolicy(function=value, fsdp1_style=_takes_recurse(value))
    raise TypeError(
        f"{owner}({option}={value!r}) is neither a set of module classes nor a callable."
        f" Pass for example {option}={{nn.TransformerDecoderLayer}}, or a function `module -> bool`."
    )


def select_modules(
    root: torch.nn.Module, policy: ModulePolicy, *, include_root: bool
) -> list[torch.nn.Module]:
    """The modules of ``root`` that ``policy`` picks, children before parents (the order to shard in).

    ``nonwrapped_numel`` for FSDP1-style callables counts the parameters of a module that no picked
    descendant already holds, as FSDP1's auto-wrapping did.
    """
    picked: list[torch.nn.Module] = []
    seen: set[int] = set()

    def visit(module: torch.nn.Module, is_root: bool) -> int:
        remaining = 0
        for child in module.children():
            remaining += visit(child, False)
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                remaining += param.numel()
        if (include_root or not is_root) and policy.select(module, remaining):
            picked.append(module)
            return 0
        return remaining

    visit(root, True)
    return picked
