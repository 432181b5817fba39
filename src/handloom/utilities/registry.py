"""``lightning.fabric.utilities.registry``.

Lightning's module holds only private helpers (loading callbacks from package entry points);
the module exists so that imports of it keep working.
"""

from __future__ import annotations

__all__: list[str] = []
