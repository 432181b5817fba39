"""Lightning's ``lightning.fabric.connector`` path, kept so imports of it resolve.

Lightning's connector defines no public names: it turns ``Fabric(...)``'s arguments into an
accelerator, strategy and plugins. In handloom that is :func:`handloom.options.resolve_plan`, one
pure function from the arguments, the environment variables and the hardware to a plan.
"""

from __future__ import annotations

__all__: list[str] = []
