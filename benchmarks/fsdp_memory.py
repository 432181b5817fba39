"""Per-rank peak memory and step time of FSDP2 against DDP: a 200M-parameter model, AdamW, 2 CPU processes.

Both sides are handloom: ``Fabric(accelerator="cpu", devices=2)`` with
``FSDPStrategy(auto_wrap_policy={Block})`` or ``DDPStrategy()``, each started with
``start_method="fork"`` by ``fabric.launch(train)``, gloo, and handloom's default of one torch
thread per process on a 2-core machine. The model is 24 residual MLP blocks (``LayerNorm(1024)``,
``Linear(1024, 4096)``, ``GELU``, ``Linear(4096, 1024)``): 201.5M parameters, 0.75 GiB in float32.
Each rank trains on its own synthetic batch of 2 x 32 tokens x 1024 features (MSE against a
random target) with ``torch.optim.AdamW``. The batch is small so that activations are a few MiB:
memory is parameters, gradients, optimizer state and what each strategy adds. DDP builds the
model normally; FSDP2 builds it in ``fabric.init_module(empty_init=True)`` (on the meta device),
so ``fabric.setup`` allocates and initialises only each rank's shards.

Jobs, one after the other in this process, DDP before FSDP2 in each pair:

1. **default malloc** (the headline): ``--warmup`` untimed then ``--steps`` timed steps.
2. **mmap threshold 1 MiB** (a diagnostic; ``--mmap-steps 0`` skips it): the same, with one
   warm-up step, after each worker called glibc's ``mallopt(M_MMAP_THRESHOLD, 1 MiB)``. By default
   glibc raises that threshold as large blocks are freed (up to 32 MiB), so the 16 MiB unsharded
   weights FSDP2 gathers and frees for every block land in the heap, and glibc keeps most of that
   memory after they are freed: resident but unused. With the threshold fixed, every block of
   1 MiB or more is its own mapping, returned to the system when freed, so the peak RSS is close to
   the peak of the live tensors. Step times of this case are slower (each step faults in fresh
   pages) and shown only for completeness.

How peak memory is measured: the peak resident set size of each worker process (``VmHWM`` in
``/proc/self/status``; ``getrusage(RUSAGE_SELF).ru_maxrss`` is the same counter, and the larger of
the two is taken). A forked worker starts with the parent's resident pages (Python, torch,
handloom: about 0.2 GiB) counted in its RSS but not the parent's earlier peak (checked on this
machine's Linux 6.18). To make sure, each worker first writes ``5`` to ``/proc/self/clear_refs``,
which resets ``VmHWM`` to the current RSS (Linux >= 4.0); if that write is refused the output says
so. The parent builds nothing and runs no torch operation (a forked child would also hang on an
OpenMP pool the parent had started). The peak covers the worker's whole life: model construction,
set-up and all steps. Each figure is the maximum over the two ranks
(``fabric.all_reduce(..., reduce_op="max")``). The table also shows the RSS at the worker's start
(inherited) and the peak by the end of ``fabric.setup``.

The figure held to the goal is FSDP2 peak / DDP peak per rank (goal <= 0.6). The step-time ratio
FSDP2 / DDP (medians over the timed steps, maximum over ranks) is informational, without a goal.

Run: ``.venv/bin/python benchmarks/fsdp_memory.py [--steps 4] [--warmup 2] [--mmap-steps 1]``
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import resource
import time
from typing import Any

import _common
import torch
import torch.nn.functional as F
from torch import nn

GOAL = 0.6
NUM_PROCESSES = 2
WIDTH = 1024
NUM_BLOCKS = 24
BATCH_SIZE = 2
TOKENS = 32
SIDES = ("ddp", "fsdp")
LABELS = {"ddp": "DDP", "fsdp": "FSDP2"}
MMAP_THRESHOLD = 1 << 20
CASES = {None: "default malloc", MMAP_THRESHOLD: "mmap threshold 1 MiB"}
GIB = 1024**3
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


class Block(nn.Module):
    """A transformer-like MLP block, ``x + Linear(GELU(Linear(LayerNorm(x))))``: one FSDP unit."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.down(F.gelu(self.up(self.norm(x))))
        return out


def build_model() -> nn.Module:
    """The 24-block, 201.5M-parameter model, on the current default device."""
    torch.manual_seed(0)
    return nn.Sequential(*(Block(WIDTH) for _ in range(NUM_BLOCKS)))


# --- memory -------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key} line")


def _reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS; False when the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _peak_rss_bytes() -> int:
    # VmHWM and ru_maxrss (KiB on Linux) are the same counter; take the larger to be safe.
    return max(_status_kib("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _fix_mmap_threshold(size: int) -> bool:
    """Call glibc's ``mallopt(M_MMAP_THRESHOLD, size)``; False where that is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, size))
    except (OSError, AttributeError):
        return False


# --- worker (runs in each forked process) -------------------------------------------------------
def _local_numel(param: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    return param.to_local().numel() if isinstance(param, DTensor) else param.numel()


def train(fabric: Any, side: str, steps: int, warmup: int, mmap_threshold: int | None) -> dict[str, float]:
    """Build, set up and train the model on one rank; return the figures, maximum over ranks."""
    fixed = mmap_threshold is None or _fix_mmap_threshold(mmap_threshold)
    reset = _reset_peak_rss()
    start_rss = _rss_bytes()
    if side == "fsdp":
        with fabric.init_module(empty_init=True):
            model = build_model()
    else:
        model = build_model()
    total_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = fabric.setup(model, optimizer)
    local_params = sum(_local_numel(p) for p in model.parameters())
    setup_peak = _peak_rss_bytes()

    generator = torch.Generator().manual_seed(100 + fabric.global_rank)
    x = torch.randn(BATCH_SIZE, TOKENS, WIDTH, generator=generator)
    y = torch.randn(BATCH_SIZE, TOKENS, WIDTH, generator=generator)
    times: list[float] = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        loss.item()
        if index >= warmup:
            times.append(time.perf_counter() - start)

    figures = {
        "start_rss": start_rss,
        "setup_peak": setup_peak,
        "peak": _peak_rss_bytes(),
        "step_s": _common.median(times),
        "local_params": local_params,
        "reset_refused": 0 if reset else 1,
        "mallopt_failed": 0 if fixed else 1,
    }
    names = list(figures)
    local = torch.tensor([float(figures[name]) for name in names], dtype=torch.float64)
    maxed = fabric.all_reduce(local, reduce_op="max")
    result = dict(zip(names, maxed.tolist(), strict=True))
    result["total_params"] = float(total_params)
    result["threads"] = float(torch.get_num_threads())
    return result


def launch(side: str, steps: int, warmup: int, mmap_threshold: int | None) -> dict[str, float]:
    """Run one two-process job for ``side`` and return its figures."""
    from handloom import Fabric
    from handloom.strategies import DDPStrategy, FSDPStrategy

    if side == "fsdp":
        strategy: Any = FSDPStrategy(auto_wrap_policy={Block}, start_method="fork")
    else:
        strategy = DDPStrategy(start_method="fork")
    fabric = Fabric(accelerator="cpu", devices=NUM_PROCESSES, strategy=strategy)
    result: dict[str, float] = fabric.launch(train, side, steps, warmup, mmap_threshold)
    return result


# --- driver -------------------------------------------------------------------------------------
def _gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def main(argv: list[str] | None = None) -> list[_common.Result]:
    """Run the DDP and FSDP2 jobs, print the table and return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per job (default 4)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per job first (default 2)")
    parser.add_argument(
        "--mmap-steps",
        type=int,
        default=1,
        help="timed steps of the mmap-threshold jobs, after 1 warm-up; 0 skips them (default 1)",
    )
    parser.add_argument("--json", help="also write the headline figures to this file")
    args = parser.parse_args(argv)
    _common.use_src()

    print(f"fsdp_memory: torch {torch.__version__}, {os.cpu_count()} CPU cores")
    print(
        f"  handloom fork launch, {NUM_PROCESSES} processes, gloo; {NUM_BLOCKS} MLP blocks of width {WIDTH},"
        f" AdamW, batch {BATCH_SIZE} x {TOKENS} tokens/process\n  default malloc: {args.warmup} warm-up +"
        f" {args.steps} timed steps per job; mmap threshold 1 MiB: "
        + (f"1 + {args.mmap_steps}" if args.mmap_steps > 0 else "skipped")
        + "\n  peak RSS per rank (VmHWM over the worker's life), maximum over ranks\n"
    )
    jobs: list[tuple[int | None, int, int]] = [(None, args.steps, args.warmup)]
    if args.mmap_steps > 0:
        jobs.append((MMAP_THRESHOLD, args.mmap_steps, 1))
    figures: dict[tuple[int | None, str], dict[str, float]] = {}
    for threshold, steps, warmup in jobs:
        for side in SIDES:
            start = time.perf_counter()
            figures[threshold, side] = launch(side, steps, warmup, threshold)
            print(f"  {CASES[threshold]}, {LABELS[side]}: {time.perf_counter() - start:.0f} s", flush=True)
    ddp, fsdp = figures[None, "ddp"], figures[None, "fsdp"]
    print(
        f"  {ddp['total_params'] / 1e6:.1f}M parameters; per rank DDP holds {ddp['local_params'] / 1e6:.1f}M,"
        f" FSDP2 {fsdp['local_params'] / 1e6:.1f}M; torch threads per process {int(ddp['threads'])}"
    )
    if any(f["reset_refused"] for f in figures.values()):
        print("  /proc/self/clear_refs was refused: the peaks include what the workers inherited")
    if any(f["mallopt_failed"] for f in figures.values()):
        print("  mallopt failed (not glibc?): the mmap-threshold case ran with the default allocator")
    print()

    rows = []
    results = []
    for threshold, _, _ in jobs:
        ddp, fsdp = figures[threshold, "ddp"], figures[threshold, "fsdp"]
        for side, f in (("ddp", ddp), ("fsdp", fsdp)):
            row = [_gib(f["start_rss"]), _gib(f["setup_peak"]), _gib(f["peak"]), f"{f['step_s']:.2f}"]
            rows.append([CASES[threshold], LABELS[side], *row])
        peak_ratio = fsdp["peak"] / ddp["peak"]
        step_ratio = fsdp["step_s"] / ddp["step_s"]
        verdict = "PASS" if peak_ratio <= GOAL else "MISS"
        setup_ratio = fsdp["setup_peak"] / ddp["setup_peak"]
        rows.append(
            ["", "FSDP2 / DDP", "", f"{setup_ratio:.3f}", f"{peak_ratio:.3f} {verdict}", f"{step_ratio:.3f}"]
        )
        results.append(
            _common.Result(
                benchmark="fsdp_memory",
                case=f"FSDP2 / DDP peak RSS per rank, {CASES[threshold]}",
                metric="ratio",
                value=peak_ratio,
                goal=GOAL,
                detail=(
                    f"{_gib(ddp['peak'])} vs {_gib(fsdp['peak'])} GiB/rank; {ddp['step_s']:.2f} vs"
                    f" {fsdp['step_s']:.2f} s/step (ratio {step_ratio:.2f}, no goal)"
                ),
            )
        )
    headers = ["allocator", "per rank", "start GiB", "set-up peak GiB", "peak GiB", "median s/step"]
    print(_common.format_table(headers, rows, align="llrrrr"))
    print(
        f"\nratio = FSDP2 / DDP, lower is better; the peak ratio's goal is <= {GOAL}, the step-time ratio"
        " has none.\nstart: RSS as the worker began (inherited from the parent); set-up peak: by the end"
        " of fabric.setup;\npeak: over the whole job. default malloc is the headline; mmap threshold"
        " 1 MiB shows how much of\nthe peak is memory glibc keeps after it was freed."
    )
    _common.write_results(args.json, results)
    return results


if __name__ == "__main__":
    main()
