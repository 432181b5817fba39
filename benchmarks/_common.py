"""Helpers shared by the benchmarks: statistics, tables, subprocess environments, JSON results.

Not a benchmark itself. Every benchmark script puts ``benchmarks/`` on ``sys.path`` (Python does
that for the script's own folder) and imports this module as ``_common``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SRC = REPO_ROOT / "src"
PYTHON = sys.executable


@dataclass(frozen=True, slots=True)
class Result:
    """One headline figure of a benchmark, compared with its goal.

    Attributes:
        benchmark: The benchmark's file stem, e.g. ``"step_overhead"``.
        case: What was measured, e.g. ``"32-true, tensor list"``.
        metric: ``"ratio"`` (handloom / plain, lower is better) or ``"seconds"``.
        value: The measured figure.
        goal: The largest acceptable value.
        detail: The medians behind the figure, for the summary table.
    """

    benchmark: str
    case: str
    metric: str
    value: float
    goal: float
    detail: str

    @property
    def passed(self) -> bool:
        """True when the figure meets its goal."""
        return self.value <= self.goal


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence."""
    return statistics.median(values)


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with ``src/`` first on ``PYTHONPATH``.

    The checkout's handloom is then imported even when the package is not pip-installed (and it is
    the same code when it is installed in editable mode).
    """
    env = dict(os.environ)
    paths = [str(SRC), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


def use_src() -> None:
    """Make ``import handloom`` find the checkout's package in this process."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))


def machine_line() -> str:
    """A one-line description of where the figures were taken."""
    import torch

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPU cores,"
        f" torch threads {torch.get_num_threads()}"
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """Render rows as a plain-text table.

    Args:
        headers: Column titles.
        rows: The cells, converted with ``str``.
        align: One letter per column, ``"l"`` or ``"r"``; by default the first column is
            left-aligned and the others right-aligned.
    """
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(row: Sequence[str]) -> str:
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align, strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def write_results(path: str | None, results: Sequence[Result]) -> None:
    """Write ``results`` as JSON to ``path`` (for ``run_all.py``); do nothing when ``path`` is None."""
    if path is None:
        return
    Path(path).write_text(json.dumps([asdict(r) for r in results], indent=2))


def read_results(path: Path) -> list[Result]:
    """Read what :func:`write_results` wrote."""
    return [Result(**item) for item in json.loads(path.read_text())]
