"""Re-running the script once per process (``strategy="ddp"``): see :mod:`handloom.script_launcher`.

Lightning defines no public names here; the module exists so its import path keeps working.
"""

from __future__ import annotations

__all__: list[str] = []
