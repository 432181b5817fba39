"""``lightning.fabric.utilities.device_parser``.

Lightning's module holds only private helpers (``_parse_gpu_ids`` and the like); handloom parses
``devices=`` in :mod:`handloom.devices`. The module exists so that imports of it keep working.
"""

from __future__ import annotations

__all__: list[str] = []
