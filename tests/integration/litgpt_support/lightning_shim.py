"""What litgpt's ``import lightning as L`` gives under the hook: handloom's Fabric, the rest Lightning's."""

from __future__ import annotations

from typing import Any

from handloom import Fabric, seed_everything

__all__ = ["Fabric", "seed_everything"]


def __getattr__(name: str) -> Any:
    import lightning

    return getattr(lightning, name)
