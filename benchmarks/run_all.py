"""Run every benchmark, each in its own interpreter, then print one summary table with the goals.

Run: ``make bench`` or ``.venv/bin/python benchmarks/run_all.py [--quick] [--only NAME ...]``.
Takes about seven minutes on a 2-core machine (``--quick``: about three). The exit status is 0 even
when a goal is missed: the figures are for reading, not a test.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("step_overhead", "import_time", "ddp_step", "launch_time", "fsdp_memory", "checkpoint_io")
# Fewer repetitions: a smoke run whose figures are noisier.
QUICK_ARGS = {
    "step_overhead": ["--steps", "1500"],
    "import_time": ["--repeats", "4"],
    "ddp_step": ["--pairs", "1", "--steps", "40", "--interleaved-steps", "60"],
    "launch_time": ["--pairs", "2"],
    "fsdp_memory": ["--warmup", "1", "--steps", "1", "--mmap-steps", "0"],
    "checkpoint_io": ["--quick"],
}


def run_one(name: str, quick: bool, folder: Path) -> tuple[list[_common.Result], float]:
    """Run ``benchmarks/<name>.py``, letting its table through, and return its figures and duration."""
    out = folder / f"{name}.json"
    argv = [
        _common.PYTHON,
        str(HERE / f"{name}.py"),
        "--json",
        str(out),
        *(QUICK_ARGS[name] if quick else []),
    ]
    start = time.perf_counter()
    proc = subprocess.run(argv, check=False, env=_common.child_env())
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or not out.exists():
        print(f"{name} failed with exit status {proc.returncode}.", file=sys.stderr)
        return [], elapsed
    return _common.read_results(out), elapsed


def _format_value(result: _common.Result) -> str:
    return f"{result.value:.3f}" if result.metric == "ratio" else f"{result.value:.3f} s"


def _format_goal(result: _common.Result) -> str:
    return f"<= {result.goal}" if result.metric == "ratio" else f"<= {result.goal} s"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and print the summary; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (noisier figures)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run just these benchmarks")
    args = parser.parse_args(argv)

    names = args.only or BENCHMARKS
    results: list[_common.Result] = []
    failed: list[str] = []
    durations: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="handloom-bench-") as tmp:
        for name in names:
            print(f"\n=== {name} ===", flush=True)
            figures, durations[name] = run_one(name, args.quick, Path(tmp))
            results.extend(figures)
            if not figures:
                failed.append(name)

    print("\n=== summary ===")
    print(_common.machine_line())
    rows = [
        [r.benchmark, r.case, _format_value(r), _format_goal(r), "PASS" if r.passed else "MISS", r.detail]
        for r in results
    ]
    rows.extend([name, "(failed)", "", "", "FAIL", ""] for name in failed)
    headers = ["benchmark", "case", "measured", "goal", "", "medians"]
    print(_common.format_table(headers, rows, align="llrrll"))
    print("\nratio = handloom / plain PyTorch (fsdp_memory: FSDP2 / DDP, both handloom), lower is better.")
    print("time per benchmark: " + ", ".join(f"{n} {s:.0f} s" for n, s in durations.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
