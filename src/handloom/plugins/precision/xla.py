"""XLA's precision plugin: handloom runs on CPU, CUDA and MPS, not on TPUs."""

from __future__ import annotations

from typing import Any

from handloom.plugins.precision.precision import Precision


class XLAPrecision(Precision):
    """Refuses: handloom has no XLA (TPU) support.

    Raises:
        NotImplementedError: Always.
    """

    def __init__(self, precision: Any = "32-true", *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            f"XLAPrecision(precision={precision!r}) needs TPUs through torch_xla, which handloom does not"
            " support. Run on CPU or CUDA with Fabric(precision=...) instead."
        )
