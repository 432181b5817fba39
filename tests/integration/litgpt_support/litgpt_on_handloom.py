"""Run litgpt on handloom with one change: its ``lightning.fabric`` imports name ``handloom`` instead.

``install()`` puts a finder at the front of ``sys.meta_path``. Each ``litgpt`` module is compiled
from its own source after two textual substitutions, exactly the edit a user makes by hand:

* ``from lightning.fabric.X import Y`` becomes ``from handloom.X import Y``;
* ``import lightning as L`` becomes ``import lightning_shim as L``, a module whose ``Fabric`` and
  ``seed_everything`` are handloom's and whose other attributes come from the real ``lightning``.

Every other line of litgpt is unchanged, so ``lightning.pytorch`` (its CLI helpers and loggers) and
``from lightning import LightningDataModule`` still come from the real Lightning. The rewritten
code is compiled in memory: no ``.pyc`` of it is written or read.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
from collections.abc import Sequence
from types import CodeType, ModuleType

SHIM = "lightning_shim"

_FROM_FABRIC = re.compile(r"^(\s*)from lightning\.fabric(?=[\s.])", re.MULTILINE)
_IMPORT_L = re.compile(r"^(\s*)import lightning as L\s*$", re.MULTILINE)
# Anything else naming lightning.fabric would silently keep using Lightning: refuse it.
_LEFTOVER = re.compile(r"^\s*(import|from)\s+lightning\.fabric\b", re.MULTILINE)


def rewrite(source: str) -> str:
    """``source`` with its ``lightning.fabric`` and ``import lightning as L`` imports pointed at handloom."""
    out = _FROM_FABRIC.sub(r"\1from handloom", source)
    out = _IMPORT_L.sub(rf"\1import {SHIM} as L", out)
    leftover = _LEFTOVER.search(out)
    if leftover is not None:
        raise ImportError(
            f"litgpt imports lightning.fabric in a form the hook does not rewrite: {leftover[0]!r}"
        )
    return out


class _RewritingLoader(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname: str) -> CodeType:
        source = self.get_source(fullname)
        assert source is not None
        return compile(rewrite(source), self.path, "exec", dont_inherit=True)


class _LitgptFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "litgpt" and not fullname.startswith("litgpt."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            return spec
        loader = _RewritingLoader(fullname, spec.origin)
        return importlib.util.spec_from_file_location(
            fullname, spec.origin, loader=loader, submodule_search_locations=spec.submodule_search_locations
        )


def install() -> None:
    """Route every later ``import litgpt...`` through the rewriting finder."""
    if any(name == "litgpt" or name.startswith("litgpt.") for name in sys.modules):
        raise RuntimeError("install() must run before litgpt is imported")
    sys.meta_path.insert(0, _LitgptFinder())
