"""Double precision (``"64-true"``): see :mod:`handloom.plugins.precision.half` for the implementation."""

from __future__ import annotations

from handloom.plugins.precision.half import DoublePrecision

__all__ = ["DoublePrecision"]
