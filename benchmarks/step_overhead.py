"""Per-step cost of handloom's wrappers on a tiny MLP, against the same loop in plain PyTorch.

The model (32 -> 64 -> 64 -> 10, batch 32, AdamW) is so small that a step is dominated by Python
and dispatcher overhead, which is exactly what Fabric's wrappers add to. Both loops run in this
process on identical copies of the model and data, each as a generator that performs one training
step per ``next()``. Blocks of ``--block`` steps alternate between plain and handloom (the order
flips every round), so drift, frequency changes and other processes fall on both sides alike;
short blocks keep each plain/handloom pair close in time, and a block that was preempted is an
outlier the median ignores. Warm-up steps run first, untimed; the garbage collector is paused
while timing (it would strike whichever side happened to be running).

Cases:

* ``tensor list``: batches are pre-built tensors in a list, so only the step itself is timed.
* ``DataLoader``: a ``DataLoader`` over a ``TensorDataset`` (200 batches an epoch); handloom
  iterates the loader returned by ``fabric.setup_dataloaders``.

Each at ``32-true`` and ``bf16-mixed``. The plain bf16 baseline runs the forward pass under
``torch.autocast("cpu", dtype=torch.bfloat16)`` and computes the loss outside it; handloom uses
``Fabric(accelerator="cpu", devices=1, precision=...)``, ``fabric.setup`` and ``fabric.backward``.

Run: ``.venv/bin/python benchmarks/step_overhead.py [--steps 4000] [--block 10]``
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import _common
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

GOAL = 1.03
BATCH_SIZE = 32
EPOCH_BATCHES = 200
PRECISIONS = ("32-true", "bf16-mixed")
SOURCES = ("tensor list", "DataLoader")

Batch = tuple[torch.Tensor, torch.Tensor]


def build_model() -> torch.nn.Module:
    """The benchmark MLP, with the same weights on every call."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )


def build_data(num_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels for ``num_batches`` batches."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(num_batches * BATCH_SIZE, 32, generator=generator)
    y = torch.randint(0, 10, (num_batches * BATCH_SIZE,), generator=generator)
    return x, y


def build_source(kind: str, x: torch.Tensor, y: torch.Tensor) -> Iterable[Batch]:
    """One epoch of batches: a list of tensors or a DataLoader."""
    if kind == "tensor list":
        return [
            (x[i : i + BATCH_SIZE].clone(), y[i : i + BATCH_SIZE].clone())
            for i in range(0, len(x), BATCH_SIZE)
        ]
    return DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=False)


def train_steps(
    forward: Callable[[torch.Tensor], torch.Tensor],
    backward: Callable[[torch.Tensor], None],
    optimizer: torch.optim.Optimizer,
    source: Iterable[Batch],
) -> Iterator[None]:
    """Train one step per ``next()``, epoch after epoch.

    Both sides run this same loop, so their bytecode is identical and only the objects differ:
    plain PyTorch passes the model (inside autocast for bf16), ``Tensor.backward`` and the
    optimizer; handloom passes what ``fabric.setup`` returned and ``fabric.backward``.
    """
    while True:
        for x, y in source:
            optimizer.zero_grad()
            loss = F.cross_entropy(forward(x), y)
            backward(loss)
            optimizer.step()
            yield


def plain_forward(model: torch.nn.Module, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The plain-PyTorch forward pass: the model itself, or the model under bf16 autocast."""
    if precision == "32-true":
        return model

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out: torch.Tensor = model(x)
        return out

    return forward


@dataclass(frozen=True, slots=True)
class CaseTiming:
    """Per-step times (µs) of every recorded block, for both sides."""

    precision: str
    source: str
    plain_us: list[float]
    handloom_us: list[float]

    @property
    def plain_median(self) -> float:
        """Median µs per step, plain PyTorch."""
        return _common.median(self.plain_us)

    @property
    def handloom_median(self) -> float:
        """Median µs per step, handloom."""
        return _common.median(self.handloom_us)

    @property
    def ratio(self) -> float:
        """The figure held to the goal: the median over rounds of handloom / plain within the round.

        Each round's two blocks ran back to back, so load that comes and goes cancels in their ratio.
        """
        return _common.median([h / p for h, p in zip(self.handloom_us, self.plain_us, strict=True)])

    @property
    def ratio_of_medians(self) -> float:
        """handloom / plain, from the two medians."""
        return self.handloom_median / self.plain_median

    @property
    def low_ratio(self) -> float:
        """handloom / plain from each side's 10th-percentile block (the least disturbed by other load)."""
        return _quantile(self.handloom_us, 0.1) / _quantile(self.plain_us, 0.1)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


CLOCKS: dict[str, Callable[[], int]] = {"wall": time.perf_counter_ns, "cpu": time.thread_time_ns}


def measure_case(
    precision: str, source: str, steps: int, block: int, warmup: int, clock: Callable[[], int]
) -> CaseTiming:
    """Time ``steps`` steps per side in alternating blocks of ``block`` steps, after ``warmup`` steps."""
    from handloom import Fabric

    x, y = build_data(EPOCH_BATCHES)

    plain_model = build_model()
    plain_optimizer = torch.optim.AdamW(plain_model.parameters(), lr=1e-3)
    plain = train_steps(
        plain_forward(plain_model, precision),
        torch.Tensor.backward,
        plain_optimizer,
        build_source(source, x, y),
    )

    fabric = Fabric(accelerator="cpu", devices=1, precision=precision)
    module = build_model()
    model, optimizer = fabric.setup(module, torch.optim.AdamW(module.parameters(), lr=1e-3))
    batches = build_source(source, x, y)
    if source == "DataLoader":
        batches = fabric.setup_dataloaders(batches)
    handloom = train_steps(model, fabric.backward, optimizer, batches)

    for _ in range(warmup):
        next(plain)
        next(handloom)
    plain_us: list[float] = []
    handloom_us: list[float] = []
    rounds = max(1, steps // block)
    gc.collect()
    gc.disable()  # a collection would land on whichever side happened to be running
    try:
        for index in range(rounds):
            sides = [(plain, plain_us), (handloom, handloom_us)]
            if index % 2:
                sides.reverse()
            for steps_iter, sink in sides:
                start = clock()
                for _ in range(block):
                    next(steps_iter)
                sink.append((clock() - start) / 1e3 / block)
            if index % 200 == 199:
                gc.collect()
    finally:
        gc.enable()
    return CaseTiming(precision, source, plain_us, handloom_us)


def main(argv: list[str] | None = None) -> list[_common.Result]:
    """Run every case, print the table and return the headline figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=4000, help="timed steps per side and case (default 4000)"
    )
    parser.add_argument("--block", type=int, default=10, help="steps per timed block (default 10)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed steps per side first (default 200)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall: elapsed time (default); cpu: this thread's CPU time",
    )
    parser.add_argument("--json", help="also write the headline figures to this file")
    args = parser.parse_args(argv)

    _common.use_src()
    torch.set_num_threads(args.threads)
    print(f"step_overhead: {_common.machine_line()}")
    print(
        f"  {args.steps} timed steps per side and case in alternating blocks of {args.block}, after"
        f" {args.warmup} warm-up steps; {args.clock} clock; MLP 32-64-64-10, batch {BATCH_SIZE}, AdamW\n"
    )
    rows = []
    results = []
    for precision in PRECISIONS:
        for source in SOURCES:
            t = measure_case(precision, source, args.steps, args.block, args.warmup, CLOCKS[args.clock])
            case = f"{t.precision}, {t.source}"
            rows.append(
                [
                    case,
                    f"{t.plain_median:.1f}",
                    f"{t.handloom_median:.1f}",
                    f"{t.handloom_median - t.plain_median:+.1f}",
                    f"{t.ratio:.3f}",
                    f"{t.ratio_of_medians:.3f}",
                    f"{t.low_ratio:.3f}",
                    f"<= {GOAL}",
                    "PASS" if t.ratio <= GOAL else "MISS",
                ]
            )
            results.append(
                _common.Result(
                    benchmark="step_overhead",
                    case=case,
                    metric="ratio",
                    value=t.ratio,
                    goal=GOAL,
                    detail=f"{t.plain_median:.1f} vs {t.handloom_median:.1f} µs/step",
                )
            )
    headers = [
        "case",
        "plain µs/step",
        "handloom µs/step",
        "extra µs",
        "ratio",
        "of medians",
        "p10",
        "goal",
        "",
    ]
    print(_common.format_table(headers, rows))
    print(
        "\nratio = median over rounds of handloom / plain within the round (the figure held to the goal);"
        "\nof medians = median handloom / median plain; p10 = the ratio of each side's 10th-percentile"
        " block,\nthe least disturbed by other load. When the three disagree, the machine was busy."
    )
    _common.write_results(args.json, results)
    return results


if __name__ == "__main__":
    main()
