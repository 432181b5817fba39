"""Lightning's TPU launcher: handloom does not support XLA devices.

Lightning defines no public names here; the module exists so its import path keeps working.
"""

from __future__ import annotations

__all__: list[str] = []
