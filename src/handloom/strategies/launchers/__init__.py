"""Lightning's ``lightning.fabric.strategies.launchers`` module path.

Lightning's launcher classes (``_MultiProcessingLauncher``, ``_SubprocessScriptLauncher``,
``_XLALauncher``) are private, so programs do not import them. In handloom, ``fabric.launch()``
starts processes through :mod:`handloom.launcher` (``torch.distributed``'s elastic agent and
``torch.multiprocessing``), chosen by the strategy's ``start_method``.
"""

from __future__ import annotations

__all__: list[str] = []
