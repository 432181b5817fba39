"""The launcher interface: private in Lightning; handloom starts processes in :mod:`handloom.launcher`.

Lightning defines no public names here; the module exists so its import path keeps working.
"""

from __future__ import annotations

__all__: list[str] = []
