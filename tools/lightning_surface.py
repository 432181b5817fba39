"""Compare Lightning Fabric's public API with handloom's and write the coverage table in the docs.

Walks every public (non-underscore) module of ``lightning.fabric`` in the installed Lightning
package and every public name each one defines or re-exports from within ``lightning.fabric``,
and looks for the same name at the same path under ``handloom``. Names handloom refuses on
purpose are listed in ``REFUSED`` with the reason, which the table shows.

    python tools/lightning_surface.py          # print what is missing
    python tools/lightning_surface.py --write  # rewrite docs/lightning-api-coverage.md
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "lightning-api-coverage.md"

# Names that exist in handloom but refuse when used, with the reason: (a fragment of the Lightning
# path, lower-cased; the reason shown in the table). The first matching fragment wins.
_NO_XLA = "no TPU/XLA support: handloom runs on CPU, CUDA and MPS; the error names the alternative"
REFUSED: tuple[tuple[str, str], ...] = (
    ("xla", _NO_XLA),
    ("tpustrategy", _NO_XLA),
    ("tpuaccelerator", _NO_XLA),
    (
        "deepspeed",
        "DeepSpeed is not handloom's engine: the error maps the ZeRO stage and offload options to"
        " `FSDPStrategy(...)` or DDP ([Strategies](strategies.md#deepspeed))",
    ),
)
# Names that work only with extra hardware or packages (still "yes": they work where those exist).
NEEDS: tuple[tuple[str, str], ...] = (
    ("transformer_engine", "needs `transformer_engine` and an FP8 GPU (Hopper or newer); untested here"),
    ("transformerengine", "needs `transformer_engine` and an FP8 GPU (Hopper or newer); untested here"),
    ("bitsandbytes", "needs `bitsandbytes>=0.45`; runs on CUDA and, unlike Lightning, on the CPU"),
    ("cuda", "needs a CUDA GPU to do anything (reports none available otherwise)"),
    ("mps", "needs Apple silicon to do anything (reports none available otherwise)"),
)


def _match(path: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    lowered = path.lower()
    return next((reason for fragment, reason in rules if fragment in lowered), None)


@dataclass(frozen=True)
class Entry:
    """One public name of Lightning Fabric and how handloom offers it."""

    module: str  # relative to lightning.fabric ("" for the package itself)
    name: str  # "" for the module itself
    status: str  # "yes", "refuses", "missing"
    note: str = ""

    @property
    def path(self) -> str:
        base = f"lightning.fabric.{self.module}" if self.module else "lightning.fabric"
        return f"{base}.{self.name}" if self.name else base

    @property
    def key(self) -> str:
        return f"{self.module}:{self.name}" if self.name else self.module


def _public_modules() -> list[str]:
    import lightning.fabric as root

    prefix = "lightning.fabric."
    names = [""]
    for info in pkgutil.walk_packages(root.__path__, prefix=prefix, onerror=lambda _: None):
        relative = info.name[len(prefix) :]
        if any(part.startswith("_") for part in relative.split(".")):
            continue
        names.append(relative)
    return sorted(names)


def _origin(value: object) -> str:
    if inspect.isclass(value) or inspect.isfunction(value):
        return str(value.__module__)
    return str(type(value).__module__)


def _public_names(module: types.ModuleType) -> list[str]:
    """``__all__`` where given; else what the module defines (a package: what it re-exports from
    lightning.fabric), not what it merely imports for its own use."""
    explicit = getattr(module, "__all__", None)
    is_package = hasattr(module, "__path__")
    names = []
    for name in explicit if explicit is not None else dir(module):
        if name.startswith("_"):
            continue
        value = getattr(module, name, None)
        if isinstance(value, types.ModuleType):
            continue
        if explicit is None:
            origin = _origin(value)
            if is_package and not origin.startswith("lightning.fabric"):
                continue
            if not is_package and origin != module.__name__:
                continue  # imported from elsewhere for the module's own use
        names.append(name)
    return sorted(set(names))


def _handloom_has(module: str, name: str) -> bool:
    target = f"handloom.{module}" if module else "handloom"
    try:
        found = importlib.import_module(target)
    except ImportError:
        return False
    if not name:
        return True
    try:
        getattr(found, name)
    except AttributeError:
        return False
    return True


def collect() -> list[Entry]:
    """Every public Lightning Fabric module and name, with handloom's status for it."""
    entries = []
    for module_name in _public_modules():
        full = f"lightning.fabric.{module_name}" if module_name else "lightning.fabric"
        try:
            module = importlib.import_module(full)
        except Exception:  # a module that needs an optional package (e.g. torch_xla)
            continue
        for name in ["", *_public_names(module)]:
            has = _handloom_has(module_name, name)
            path = Entry(module_name, name, "").path
            refused = _match(path, REFUSED)
            if not has:
                entries.append(Entry(module_name, name, "missing", refused or ""))
            elif refused is not None:
                entries.append(Entry(module_name, name, "refuses", refused))
            else:
                entries.append(Entry(module_name, name, "yes", _match(path, NEEDS) or ""))
    return entries


def render(entries: list[Entry]) -> str:
    """The coverage page (Markdown)."""
    import lightning

    total = len(entries)
    offered = sum(e.status != "missing" for e in entries)
    lines = [
        "# Lightning Fabric's public API in handloom",
        "",
        "Generated by `python tools/lightning_surface.py --write` against Lightning"
        f" {lightning.__version__}:",
        "every public module of `lightning.fabric` and every public name it defines, and where the same",
        "name lives in handloom (`lightning.fabric.X.Y` is `handloom.X.Y`). A test",
        "(`tests/unit/test_lightning_surface.py`) fails when a name is missing or this page is stale.",
        "",
        f"{offered} of {total} names are offered. Status: **yes** works as in Lightning (differences in"
        " behaviour are listed in [Migrating from Lightning Fabric](migrating-from-lightning-fabric.md));"
        " **refuses** exists and raises a clear error saying why and what to use instead.",
        "",
        "| Lightning name | handloom | status | note |",
        "|---|---|---|---|",
    ]
    for e in entries:
        handloom_path = e.path.replace("lightning.fabric", "handloom", 1)
        lines.append(f"| `{e.path}` | `{handloom_path}` | {e.status} | {e.note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite docs/lightning-api-coverage.md")
    parser.add_argument("--check", action="store_true", help="fail when the page is not up to date")
    args = parser.parse_args(argv)
    entries = collect()
    missing = [e for e in entries if e.status == "missing"]
    for e in missing:
        print(f"missing: {e.path}")
    print(f"{len(entries) - len(missing)} of {len(entries)} offered")
    page = render(entries)
    if args.write:
        DOC.write_text(page)
    stale = args.check and (not DOC.exists() or DOC.read_text() != page)
    if stale:
        print(f"{DOC} is out of date: run `python tools/lightning_surface.py --write`")
    return 1 if missing or stale else 0


if __name__ == "__main__":
    sys.exit(main())
