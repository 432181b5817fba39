"""What ``import handloom; from handloom import Fabric`` costs on top of ``import torch``.

Each repetition is a fresh interpreter that imports torch, then handloom and ``Fabric``, and
reports both durations (``time.perf_counter`` around each import). torch is the "plain PyTorch"
side: every PyTorch program pays for it, so handloom's cost is the time after it. The first
repetition only warms the file cache and is not recorded.

A last interpreter runs with ``-X importtime`` and lists the modules that importing handloom
pulled in (beyond torch) that took longest, so a regression can be traced to its import.

Run: ``.venv/bin/python benchmarks/import_time.py [--repeats 10]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
from dataclasses import dataclass

import _common

GOAL_S = 0.1
_MARKER = "--- handloom import starts ---"

_TIMED = """
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import handloom
from handloom import Fabric
t2 = time.perf_counter()
print(json.dumps({"torch": t1 - t0, "handloom": t2 - t1}))
"""

_TRACED = f"""
import sys
import torch
sys.stderr.write({_MARKER!r} + "\\n")
sys.stderr.flush()
import handloom
# Named explicitly: the lazy `from handloom import Fabric` goes through importlib.import_module,
# which -X importtime does not report.
import handloom.fabric
from handloom import Fabric
"""


@dataclass(frozen=True, slots=True)
class ImportLine:
    """One line of ``-X importtime`` output."""

    self_us: int
    cumulative_us: int
    depth: int
    name: str


def time_once() -> dict[str, float]:
    """Seconds spent importing torch, then handloom and Fabric, in a fresh interpreter."""
    proc = subprocess.run(
        [_common.PYTHON, "-c", _TIMED],
        env=_common.child_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    seconds: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return seconds


def trace_imports() -> list[ImportLine]:
    """The ``-X importtime`` lines for modules imported after torch."""
    proc = subprocess.run(
        [_common.PYTHON, "-X", "importtime", "-c", _TRACED],
        env=_common.child_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    lines = proc.stderr.split(_MARKER, 1)[-1].splitlines()
    parsed = []
    for line in lines:
        if not line.startswith("import time:") or "|" not in line:
            continue
        fields = line[len("import time:") :].split("|")
        try:
            self_us, cumulative_us = int(fields[0]), int(fields[1])
        except ValueError:  # the header line
            continue
        name = fields[2].rstrip()
        depth = (len(name) - len(name.lstrip())) // 2
        parsed.append(ImportLine(self_us, cumulative_us, depth, name.strip()))
    return parsed


def main(argv: list[str] | None = None) -> list[_common.Result]:
    """Run the repetitions, print the table and return the headline figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="recorded interpreters (default 10)")
    parser.add_argument("--top", type=int, default=8, help="slowest imports to list (default 8)")
    parser.add_argument("--json", help="also write the headline figure to this file")
    args = parser.parse_args(argv)

    print(f"import_time: {_common.machine_line()}")
    print(f"  {args.repeats} fresh interpreters after 1 warm-up\n")
    time_once()
    runs = [time_once() for _ in range(args.repeats)]
    torch_s = _common.median([r["torch"] for r in runs])
    extra_s = _common.median([r["handloom"] for r in runs])
    rows = [
        ["import torch (plain PyTorch)", f"{torch_s:.3f}", f"{min(r['torch'] for r in runs):.3f}", "", ""],
        [
            "+ import handloom, Fabric",
            f"{extra_s:.3f}",
            f"{min(r['handloom'] for r in runs):.3f}",
            f"<= {GOAL_S}",
            "PASS" if extra_s <= GOAL_S else "MISS",
        ],
    ]
    print(_common.format_table(["step", "median s", "min s", "goal", ""], rows))

    traced = trace_imports()
    # handloom, handloom.fabric and what they import directly; cumulative times include the rest.
    slowest = sorted((i for i in traced if i.depth <= 1), key=lambda i: -i.cumulative_us)
    print(f"\nSlowest imports triggered by handloom (-X importtime, one run, {len(traced)} modules in all):")
    print(
        _common.format_table(
            ["module", "cumulative ms", "self ms"],
            [[i.name, f"{i.cumulative_us / 1e3:.1f}", f"{i.self_us / 1e3:.1f}"] for i in slowest[: args.top]],
        )
    )
    results = [
        _common.Result(
            benchmark="import_time",
            case="import handloom + Fabric, after torch",
            metric="seconds",
            value=extra_s,
            goal=GOAL_S,
            detail=f"{extra_s * 1e3:.0f} ms extra (import torch itself: {torch_s:.2f} s)",
        )
    ]
    _common.write_results(args.json, results)
    return results


if __name__ == "__main__":
    main()
