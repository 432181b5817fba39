"""DeepSpeed's precision plugin: DeepSpeed is not handloom's engine, so this name refuses with a way out."""

from __future__ import annotations

from typing import Any

from handloom.plugins.precision.precision import Precision


class DeepSpeedPrecision(Precision):
    """Refuses: handloom shards with FSDP2, not DeepSpeed.

    Raises:
        NotImplementedError: Always, naming the precision to pass to ``Fabric`` instead.
    """

    def __init__(self, precision: Any = "32-true", *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            f"DeepSpeedPrecision(precision={precision!r}) belongs to DeepSpeed, which handloom does not run:"
            " it shards with PyTorch's FSDP2. Pass Fabric(strategy=FSDPStrategy(...),"
            f" precision={precision!r}) instead (see docs/strategies.md for the DeepSpeed stage mapping)."
        )
