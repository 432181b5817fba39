"""Name -> class registries with Lightning's API (``ACCELERATOR_REGISTRY``, ``STRATEGY_REGISTRY``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class _NamedRegistry(dict[str, dict[str, Any]]):
    """Names mapped to a class (or factory) and the keyword arguments it is built with.

    Each entry is a dict with the keys ``description``, ``init_params``, ``<kind>`` (the class) and
    ``<kind>_name``, as in Lightning, so code that reads the registry directly keeps working.
    """

    kind = "object"

    def register(
        self,
        name: str,
        target: Callable[..., Any] | None = None,
        description: str | None = None,
        override: bool = False,
        **init_params: Any,
    ) -> Callable[..., Any]:
        """Register ``target`` under ``name``; without ``target``, return a class decorator that does.

        Args:
            name: The name users pass, e.g. ``Fabric(strategy=name)``.
            target: The class (or a factory) to build.
            description: A short description.
            override: Replace an existing entry instead of raising.
            **init_params: Keyword arguments ``get(name)`` builds the object with.

        Raises:
            TypeError: ``name`` is not a string.
            ValueError: ``name`` is registered already and ``override`` is False.
        """
        if not isinstance(name, str):
            raise TypeError(f"{type(self).__name__}.register(name={name!r}) must be given a string name.")
        if name in self and not override:
            raise ValueError(
                f"{type(self).__name__}.register({name!r}, ...) names an entry that exists already."
                " Pass override=True to replace it, or choose another name."
            )

        def add(value: Callable[..., Any]) -> Callable[..., Any]:
            self[name] = {
                "description": description or "",
                "init_params": init_params,
                self.kind: value,
                f"{self.kind}_name": name,
            }
            return value

        return add(target) if target is not None else add

    def get(self, name: str, default: Any = None) -> Any:
        """Build the object registered as ``name``, or return ``default`` when it is unknown.

        Raises:
            KeyError: ``name`` is not registered and no ``default`` was given (lists the names).
        """
        if name in self:
            entry = self[name]
            return entry[self.kind](**entry["init_params"])
        if default is not None:
            return default
        known = ", ".join(sorted(self)) or "none"
        raise KeyError(f"{name!r} is not a registered {self.kind}. Registered names: {known}.")

    def remove(self, name: str) -> None:
        """Remove the entry ``name``."""
        self.pop(name)

    def __str__(self) -> str:
        return f"Registered {self.kind}s: {', '.join(self)}"


class _AcceleratorRegistry(_NamedRegistry):
    """Accelerator names accepted by ``Fabric(accelerator=...)``: ``cpu``, ``cuda``, ``mps``, ``tpu``."""

    kind = "accelerator"

    def available_accelerators(self) -> set[str]:
        """The registered names."""
        return set(self)


def call_register_accelerators(registry: _AcceleratorRegistry, base_module: str) -> None:
    """Register every :class:`Accelerator` subclass found in the module ``base_module``.

    Kept for code written against Lightning's legacy helper of the same name.
    """
    from handloom.accelerators.accelerator import Accelerator

    module = importlib.import_module(base_module)
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Accelerator) and value is not Accelerator:
            value.register_accelerators(registry)
