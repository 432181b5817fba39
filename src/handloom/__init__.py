"""handloom: keep your PyTorch training loop, scale it from one laptop process to a cluster.

``from handloom import Fabric`` is the whole entry point. Importing the package is cheap: the
heavy parts load when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from handloom._version import __version__

if TYPE_CHECKING:
    from handloom.fabric import Fabric
    from handloom.seed import seed_everything
    from handloom.wrappers import is_wrapped

__all__ = ["Fabric", "__version__", "is_wrapped", "seed_everything"]

_LAZY = {
    "Fabric": "handloom.fabric",
    "seed_everything": "handloom.seed",
    "is_wrapped": "handloom.wrappers",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'handloom' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
