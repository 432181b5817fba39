"""Two-process DDP step time: handloom's ``ddp`` strategy against plain ``DistributedDataParallel``.

Every job is launched by torchrun (``python -m torch.distributed.run --nproc-per-node 2``) and
trains the same model (MLP 256 -> 1024 -> 1024 -> 10, batch 64 per process, AdamW) on the same
data, with gloo on CPU and one thread per process. This file is both the driver and the worker.

1. Separate launches (the headline): the driver alternates plain and handloom jobs (the order
   flips every pair). In each job every rank runs warm-up steps, then times ``--steps`` steps one
   by one; rank 0 prints the median. Per side, the driver takes the median of the jobs' medians.
2. One interleaved job (a cross-check): a handloom model and two plain DDP models live in the
   same two processes and share the process group; blocks of ``--block`` steps rotate between
   them. Launch-to-launch variation (which core each rank got, what else was running) cancels.
   The second plain model is a control arm: its ratio to the first is what noise alone gives.

Run: ``.venv/bin/python benchmarks/ddp_step.py [--pairs 4] [--steps 60]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import _common
import torch
import torch.distributed as dist
import torch.nn.functional as F

GOAL = 1.02
NUM_PROCESSES = 2
BATCH_SIZE = 64
NUM_BATCHES = 16
SIDES = ("plain", "handloom")
_RESULT_TAG = "DDP_STEP_RESULT "


# --- worker (runs under torchrun) ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Trainer:
    """What one side's training step needs."""

    model: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    backward: Callable[[torch.Tensor], None]
    rank: int


def _build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(256, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    )


def _build_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(100 + rank)
    return [
        (
            torch.randn(BATCH_SIZE, 256, generator=generator),
            torch.randint(0, 10, (BATCH_SIZE,), generator=generator),
        )
        for _ in range(NUM_BATCHES)
    ]


def _setup_plain() -> _Trainer:
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    model = DistributedDataParallel(_build_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return _Trainer(model, optimizer, torch.Tensor.backward, dist.get_rank())


def _setup_handloom() -> _Trainer:
    _common.use_src()
    from handloom import Fabric

    fabric = Fabric(accelerator="cpu", devices=NUM_PROCESSES, strategy="ddp")
    fabric.launch()
    module = _build_model()
    model, optimizer = fabric.setup(module, torch.optim.AdamW(module.parameters(), lr=1e-3))
    return _Trainer(model, optimizer, fabric.backward, fabric.global_rank)


def _steps(trainer: _Trainer) -> Iterator[None]:
    """Train forever, one step per ``next()``."""
    model, optimizer, backward = trainer.model, trainer.optimizer, trainer.backward
    batches = _build_batches(trainer.rank)
    while True:
        for x, y in batches:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            backward(loss)
            optimizer.step()
            yield


def _time_steps(steps: Iterator[None], count: int) -> float:
    """Milliseconds per step over ``count`` steps."""
    start = time.perf_counter()
    for _ in range(count):
        next(steps)
    return (time.perf_counter() - start) * 1e3 / count


def run_worker(mode: str, steps: int, warmup: int, block: int) -> None:
    """Train under torchrun; rank 0 prints the median ms per step by arm as one tagged JSON line."""
    torch.set_num_threads(1)
    if mode == "interleaved":
        # Fabric creates the process group; both plain models reuse it. The second plain model is
        # a control: its ratio to the first shows how much of a difference is noise.
        trainers = {"handloom": _setup_handloom(), "plain": _setup_plain(), "control": _setup_plain()}
    else:
        trainers = {mode: _setup_plain() if mode == "plain" else _setup_handloom()}
    arms = list(trainers)
    iterators = {arm: _steps(trainer) for arm, trainer in trainers.items()}
    for arm_steps in iterators.values():
        _time_steps(arm_steps, warmup)
    dist.barrier()
    times_ms: dict[str, list[float]] = {arm: [] for arm in arms}
    for index in range(max(1, steps // block)):
        # Rotate the order each round so that no arm always follows the same one.
        shift = index % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            times_ms[arm].append(_time_steps(iterators[arm], block))
    if dist.get_rank() == 0:
        summary = {arm: _common.median(values) for arm, values in times_ms.items()}
        if "plain" in times_ms:
            # Per round, each arm's time over the plain arm's in the same round; then the median.
            for arm in arms:
                ratios = [a / p for a, p in zip(times_ms[arm], times_ms["plain"], strict=True)]
                summary[f"{arm}/plain"] = _common.median(ratios)
        print(_RESULT_TAG + json.dumps(summary), flush=True)
    dist.barrier()
    dist.destroy_process_group()


# --- driver -------------------------------------------------------------------------------------
def launch(mode: str, steps: int, warmup: int, block: int) -> dict[str, float]:
    """Run one torchrun job and return rank 0's median ms per step, by side."""
    command = [
        _common.PYTHON,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(NUM_PROCESSES),
        str(Path(__file__).resolve()),
        *("--worker", mode, "--steps", str(steps), "--warmup", str(warmup), "--block", str(block)),
    ]
    proc = subprocess.run(
        command, check=False, env=_common.child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True
    )
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_TAG):
            summary: dict[str, float] = json.loads(line[len(_RESULT_TAG) :])
            return summary
    raise RuntimeError(
        f"The {mode} DDP job exited with status {proc.returncode} without a result.\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )


def main(argv: list[str] | None = None) -> list[_common.Result]:
    """Run the separate and the interleaved jobs, print the table and return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4, help="separate launches per side (default 4)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per separate job (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per side first (default 10)")
    parser.add_argument(
        "--interleaved-steps",
        type=int,
        default=150,
        help="timed steps per arm, interleaved job (default 150)",
    )
    parser.add_argument("--block", type=int, default=1, help="steps per block, interleaved job (default 1)")
    parser.add_argument("--json", help="also write the headline figures to this file")
    parser.add_argument("--worker", choices=(*SIDES, "interleaved"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        run_worker(args.worker, args.steps, args.warmup, args.block)
        return []

    print(f"ddp_step: {_common.machine_line()}")
    print(
        f"  torchrun, {NUM_PROCESSES} processes, gloo, 1 thread each; MLP 256-1024-1024-10, batch"
        f" {BATCH_SIZE}/process, AdamW\n  separate: {args.pairs} launches per side, {args.warmup} warm-up +"
        f" {args.steps} timed steps each; interleaved: one launch, {args.interleaved_steps} steps per arm"
        f" in blocks of {args.block}\n"
    )
    medians: dict[str, list[float]] = {side: [] for side in SIDES}
    for pair in range(args.pairs):
        for side in SIDES if pair % 2 == 0 else SIDES[::-1]:
            median_ms = launch(side, args.steps, args.warmup, 1)[side]
            medians[side].append(median_ms)
            print(f"  separate launch {pair + 1}/{args.pairs} {side:8s} median {median_ms:.2f} ms/step")
    together = launch("interleaved", args.interleaved_steps, args.warmup, args.block)
    print(
        f"  interleaved launch: plain {together['plain']:.2f}, plain control {together['control']:.2f},"
        f" handloom {together['handloom']:.2f} ms/step\n"
    )

    plain = _common.median(medians["plain"])
    handloom = _common.median(medians["handloom"])
    spread = max(max(v) for v in medians.values()) / min(min(v) for v in medians.values())
    figures = [
        ("separate launches", plain, handloom, handloom / plain, f"launch medians vary {spread:.2f}x"),
        (
            "one job, interleaved",
            together["plain"],
            together["handloom"],
            together["handloom/plain"],
            f"control / plain {together['control/plain']:.3f}",
        ),
    ]
    rows = []
    results = []
    for case, plain_ms, handloom_ms, ratio, noise in figures:
        verdict = "PASS" if ratio <= GOAL else "MISS"
        rows.append(
            [case, f"{plain_ms:.2f}", f"{handloom_ms:.2f}", f"{ratio:.3f}", f"<= {GOAL}", verdict, noise]
        )
        results.append(
            _common.Result(
                benchmark="ddp_step",
                case=f"DDP, 2 processes, {case}",
                metric="ratio",
                value=ratio,
                goal=GOAL,
                detail=f"{plain_ms:.2f} vs {handloom_ms:.2f} ms/step; {noise}",
            )
        )
    headers = ["DDP, 2 processes", "plain ms/step", "handloom ms/step", "ratio", "goal", "", "noise"]
    print(_common.format_table(headers, rows, align="lrrrrll"))
    print(
        "\nseparate: ratio of the medians of each side's launch medians (the headline the goal was set"
        " for);\ninterleaved: median over rounds of handloom / plain within the round, in one job; the"
        " control arm is\na second plain DDP model, so control / plain is what noise alone gives."
    )
    _common.write_results(args.json, results)
    return results


if __name__ == "__main__":
    main()
