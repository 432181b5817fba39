"""Launch-to-exit wall time of a trivial 2-process job: ``handloom run`` against plain ``torchrun``.

Each trivial script joins a gloo process group, all-reduces one tensor, checks the sum and exits:

* handloom: ``handloom run --accelerator cpu --devices 2 trivial.py``, the script using
  ``Fabric(); fabric.launch(); fabric.all_reduce(...)``;
* plain: ``torchrun --nproc-per-node 2 trivial.py``, the script using
  ``torch.distributed.init_process_group("gloo")`` and ``all_reduce``.

Both rendezvous on a free port torchrun picks. Launches alternate (the order flips every pair)
after one unrecorded warm-up launch of each, and the medians are compared. The CPU time of each
launch's whole process tree is reported next to the wall time: a shared machine disturbs it less.

Run: ``.venv/bin/python benchmarks/launch_time.py [--pairs 5]``
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import _common

GOAL = 1.2
SIDES = ("plain", "handloom")

_PLAIN_SCRIPT = """\
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
total = torch.ones(1)
dist.all_reduce(total)
assert total.item() == dist.get_world_size() == 2, total
dist.destroy_process_group()
print("trivial-ok")
"""

_HANDLOOM_SCRIPT = """\
import torch
from handloom import Fabric

fabric = Fabric()
fabric.launch()
total = fabric.all_reduce(torch.ones(1), reduce_op="sum")
assert total.item() == fabric.world_size == 2, total
print("trivial-ok")
"""


def command(side: str, folder: Path) -> list[str]:
    """The launch command for ``side``, with its trivial script written into ``folder``."""
    if side == "plain":
        script = folder / "trivial_torchrun.py"
        script.write_text(_PLAIN_SCRIPT)
        return [_common.PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)]
    script = folder / "trivial_handloom.py"
    script.write_text(_HANDLOOM_SCRIPT)
    return [_common.PYTHON, "-m", "handloom", "run", "--accelerator", "cpu", "--devices", "2", str(script)]


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_launch(argv: list[str]) -> tuple[float, float]:
    """Wall seconds from starting ``argv`` to its exit, and the CPU seconds its process tree used.

    Raises:
        RuntimeError: The job failed or its workers did not both finish.
    """
    cpu_before = _children_cpu_seconds()
    start = time.perf_counter()
    proc = subprocess.run(argv, check=False, env=_common.child_env(), capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    cpu = _children_cpu_seconds() - cpu_before
    if proc.returncode != 0 or proc.stdout.count("trivial-ok") != 2:
        raise RuntimeError(
            f"{' '.join(argv)} exited with status {proc.returncode}.\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return elapsed, cpu


def main(argv: list[str] | None = None) -> list[_common.Result]:
    """Alternate the launches, print the table and return the headline figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="recorded launches per side (default 5)")
    parser.add_argument("--json", help="also write the headline figure to this file")
    args = parser.parse_args(argv)

    print(f"launch_time: {_common.machine_line()}")
    print(f"  {args.pairs} launches per side after 1 warm-up each; 2 processes, gloo, one all_reduce\n")
    seconds: dict[str, list[float]] = {side: [] for side in SIDES}
    cpu_seconds: dict[str, list[float]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="handloom-bench-") as tmp:
        commands = {side: command(side, Path(tmp)) for side in SIDES}
        for side in SIDES:
            time_launch(commands[side])
        for pair in range(args.pairs):
            order = SIDES if pair % 2 == 0 else SIDES[::-1]
            for side in order:
                wall, cpu = time_launch(commands[side])
                seconds[side].append(wall)
                cpu_seconds[side].append(cpu)

    plain = _common.median(seconds["plain"])
    handloom = _common.median(seconds["handloom"])
    ratio = handloom / plain
    plain_cpu = _common.median(cpu_seconds["plain"])
    handloom_cpu = _common.median(cpu_seconds["handloom"])
    rows = [
        [
            "torchrun --nproc-per-node 2",
            f"{plain:.2f}",
            f"{min(seconds['plain']):.2f}",
            f"{plain_cpu:.2f}",
            "",
            "",
            "",
            "",
        ],
        [
            "handloom run --accelerator cpu --devices 2",
            f"{handloom:.2f}",
            f"{min(seconds['handloom']):.2f}",
            f"{handloom_cpu:.2f}",
            f"{ratio:.3f}",
            f"{handloom_cpu / plain_cpu:.3f}",
            f"<= {GOAL}",
            "PASS" if ratio <= GOAL else "MISS",
        ],
    ]
    headers = ["launcher", "median s", "min s", "CPU s", "ratio", "CPU ratio", "goal", ""]
    print(_common.format_table(headers, rows))
    print(
        "\nratio = median wall time, handloom / torchrun (the figure held to the goal);"
        "\nCPU s = median user + system CPU time of the whole process tree (agent and both workers);"
        "\nother load on the machine disturbs it less."
    )
    results = [
        _common.Result(
            benchmark="launch_time",
            case="launch to exit, 2 processes",
            metric="ratio",
            value=ratio,
            goal=GOAL,
            detail=f"{plain:.2f} vs {handloom:.2f} s",
        )
    ]
    _common.write_results(args.json, results)
    return results


if __name__ == "__main__":
    main()
