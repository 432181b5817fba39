"""``lightning.fabric.utilities.logger``.

Lightning's module holds only private helpers for its loggers (``_convert_params``,
``_flatten_dict``, ...); handloom's loggers have their own in :mod:`handloom.loggers`. The
module exists so that imports of it keep working.
"""

from __future__ import annotations

__all__: list[str] = []
