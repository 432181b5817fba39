"""Starting ``fabric.launch(fn)`` in spawned or forked processes: see :mod:`handloom.launcher`.

Lightning defines no public names here; the module exists so its import path keeps working.
"""

from __future__ import annotations

__all__: list[str] = []
