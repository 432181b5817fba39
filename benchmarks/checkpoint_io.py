"""Checkpoint I/O: ``fabric.save`` / ``fabric.load`` against plain ``torch.save`` / ``torch.load``.

The state is a stack of ``nn.Linear(4096, 4096)`` layers in float32: 6 layers (100.7M parameters,
0.40 GB) or 30 (503.4M, 2.01 GB), saved as ``{"model": model}``; optionally the 100M model with an
AdamW optimizer after one step (its two moments triple the bytes: 1.21 GB). Every file goes to a
temporary directory on the local disk (``--dir``, default the system's temporary directory).

Per case, each round times these operations once (their order rotates from round to round, so
drift and a busy machine fall on all of them alike), after one untimed warm-up round:

* ``torch.save``: ``torch.save(model.state_dict(), path)``, the plain baseline (the data lands in
  the page cache; the kernel writes it to disk later);
* ``torch.save + fsync``: the same, then ``os.fsync`` of the file, which is what a user who wants
  the checkpoint on disk pays (handloom's save fsyncs the file and its directory);
* ``fabric.save``: ``fabric.save(path, {"model": model})``, blocking: an atomic write (temporary
  file, fsync, rename, fsync of the directory) of exactly that state;
* ``fabric.save(async_save=True)``: the time until the call returns (the training-loop stall);
  the background write is then awaited with ``handloom.checkpoint.background.wait()``, outside
  the stall, and the time from the call to the file being written is reported beside it.

Then, in alternating order, the loads from the files just written (so from the page cache):
``model.load_state_dict(torch.load(path, weights_only=True))`` of the ``torch.save`` file against
``fabric.load(path, {"model": model})`` of the blocking ``fabric.save`` file. Two diagnostics with
no goal show the floor of the async stall: cloning every tensor of the state (fresh memory, as an
async save does) and ``copy_`` into buffers allocated once and reused.

Before every timed operation its target file is deleted and ``os.sync()`` runs (untimed), so no
operation pays for writing back another's dirty pages; the garbage collector is paused while
timing. Figures are medians over ``--repeats`` rounds (default 4); ``paired`` is the median over
rounds of the ratio within the round; ``CPU s`` is the process's user + system CPU time (all
threads) during the operation, which other load disturbs less than the wall time. ``--quick``
times only the 100M model, without AdamW, in 3 rounds.

Goals: save and load throughput of handloom at least 0.95 of plain PyTorch's (``torch time /
handloom time >= 0.95``); async stall at most 0.2 of the blocking ``fabric.save``. With ``--json``
the figures are written in ``run_all.py``'s convention (handloom / plain time, lower is better), so
the throughput goals appear there as ``<= 1.0526``.

Run: ``.venv/bin/python benchmarks/checkpoint_io.py [--quick] [--sizes 100M 500M] [--repeats 4]``
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
import torch

WIDTH = 4096
LAYERS = {"100M": 6, "500M": 30}
THROUGHPUT_GOAL = 0.95  # plain time / handloom time, at least
STALL_GOAL = 0.2  # async return time / blocking fabric.save time, at most

SAVE_OPS = ("torch.save", "torch.save + fsync", "fabric.save", "fabric.save async")
LOAD_OPS = ("torch.load + load_state_dict", "fabric.load")


@dataclass
class Case:
    """One state to save: a model, maybe its optimizer, the Fabric that saves it, the timings."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    fabric: Any
    wrapped: dict[str, Any]
    nbytes: int
    times: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    buffers: list[torch.Tensor] = field(default_factory=list)

    def plain_state(self) -> Any:
        """What a plain PyTorch user saves: the model's state dict (and the optimizer's)."""
        if self.optimizer is None:
            return self.model.state_dict()
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def plain_load(self, path: Path) -> None:
        """What a plain PyTorch user does to resume from ``path``."""
        data = torch.load(path, weights_only=True)
        if self.optimizer is None:
            self.model.load_state_dict(data)
        else:
            self.model.load_state_dict(data["model"])
            self.optimizer.load_state_dict(data["optimizer"])


def build_case(name: str, size: str, with_adamw: bool) -> Case:
    """The model of ``size`` (and an AdamW with state), set up with a fresh single-device Fabric."""
    from handloom import Fabric

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS[size])])
    optimizer = None
    fabric = Fabric(accelerator="cpu", devices=1)
    if with_adamw:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for parameter in model.parameters():
            parameter.grad = torch.full_like(parameter, 1e-3)
        optimizer.step()  # creates exp_avg and exp_avg_sq
        optimizer.zero_grad(set_to_none=True)
        wrapped_model, wrapped_optimizer = fabric.setup(model, optimizer)
        wrapped = {"model": wrapped_model, "optimizer": wrapped_optimizer}
    else:
        wrapped = {"model": fabric.setup_module(model)}
    case = Case(name, model, optimizer, fabric, wrapped, 0)
    case.nbytes = sum(t.numel() * t.element_size() for t in _tensors(case.plain_state()))
    return case


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads, the background writer's too
    return usage.ru_utime + usage.ru_stime


def _timed(target: Path | None, action: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds ``action`` takes, after deleting ``target`` and flushing dirty pages (untimed)."""
    if target is not None:
        target.unlink(missing_ok=True)
    os.sync()
    gc.collect()
    gc.disable()
    try:
        cpu = _cpu_seconds()
        start = time.perf_counter()
        action()
        return time.perf_counter() - start, _cpu_seconds() - cpu
    finally:
        gc.enable()


def run_round(case: Case, folder: Path, index: int, record: bool) -> None:
    """Time every operation once; the save order rotates with ``index``, the load order alternates."""
    from handloom.checkpoint import background

    fabric = case.fabric
    paths = {op: folder / f"{op.replace(' ', '_').replace('+', 'and')}.pt" for op in SAVE_OPS}
    found: dict[str, tuple[float, float]] = {}

    def plain_save(path: Path, sync: bool) -> None:
        torch.save(case.plain_state(), path)
        if sync:
            _fsync(path)

    actions: dict[str, Callable[[], object]] = {
        "torch.save": lambda: plain_save(paths["torch.save"], False),
        "torch.save + fsync": lambda: plain_save(paths["torch.save + fsync"], True),
        "fabric.save": lambda: fabric.save(paths["fabric.save"], case.wrapped),
        "fabric.save async": lambda: fabric.save(paths["fabric.save async"], case.wrapped, async_save=True),
    }
    shift = index % len(SAVE_OPS)
    for op in SAVE_OPS[shift:] + SAVE_OPS[:shift]:
        found[op] = _timed(paths[op], actions[op])
        if op == "fabric.save async":
            cpu, start = _cpu_seconds(), time.perf_counter()
            background.wait()  # not part of the stall
            wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
            found["fabric.save async, written"] = (found[op][0] + wall, found[op][1] + cpu)

    state = case.plain_state()
    found["clone (fresh memory)"] = _timed(None, lambda: [t.clone() for t in _tensors(state)])
    if not case.buffers:  # allocated once per case, touched first by the warm-up round
        case.buffers = [torch.empty_like(t) for t in _tensors(state)]
    found["copy_ (reused buffers)"] = _timed(
        None, lambda: [b.copy_(t) for b, t in zip(case.buffers, _tensors(state), strict=True)]
    )

    loads: dict[str, Callable[[], object]] = {
        "torch.load + load_state_dict": lambda: case.plain_load(paths["torch.save"]),
        "fabric.load": lambda: fabric.load(paths["fabric.save"], case.wrapped),
    }
    for op in LOAD_OPS if index % 2 == 0 else LOAD_OPS[::-1]:
        found[op] = _timed(None, loads[op])
    if record:
        for op, (wall, cpu) in found.items():
            case.times.setdefault(op, []).append(wall)
            case.cpu.setdefault(op, []).append(cpu)


def _paired(case: Case, numerator: str, denominator: str) -> float:
    return statistics.median(
        n / d for n, d in zip(case.times[numerator], case.times[denominator], strict=True)
    )


def report(case: Case) -> tuple[list[list[str]], list[_common.Result]]:
    """The table rows of ``case`` and its headline figures (in run_all's handloom / plain convention)."""
    med = {op: _common.median(values) for op, values in case.times.items()}
    gb = case.nbytes / 1e9

    def row(
        op: str, label: str, ratio: str = "", paired: str = "", goal: str = "", mark: str = ""
    ) -> list[str]:
        seconds = med[op]
        return [
            case.name,
            label,
            f"{seconds:.3f}",
            f"{min(case.times[op]):.3f}",
            f"{_common.median(case.cpu[op]):.3f}",
            f"{gb / seconds:.2f}",
            ratio,
            paired,
            goal,
            mark,
        ]

    save_ratio = med["torch.save"] / med["fabric.save"]
    fsync_ratio = med["torch.save + fsync"] / med["fabric.save"]
    load_ratio = med["torch.load + load_state_dict"] / med["fabric.load"]
    stall = med["fabric.save async"] / med["fabric.save"]
    written = med["fabric.save async, written"] / med["fabric.save"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    rows = [
        row("torch.save", "save: torch.save(state_dict)"),
        row("torch.save + fsync", "save: torch.save + fsync"),
        row(
            "fabric.save",
            "save: fabric.save (vs torch.save)",
            f"{save_ratio:.3f}",
            f"{_paired(case, 'torch.save', 'fabric.save'):.3f}",
            f">= {THROUGHPUT_GOAL}",
            verdict(save_ratio >= THROUGHPUT_GOAL),
        ),
        [
            case.name,
            "save: fabric.save (vs torch.save + fsync)",
            "",
            "",
            "",
            "",
            f"{fsync_ratio:.3f}",
            f"{_paired(case, 'torch.save + fsync', 'fabric.save'):.3f}",
            "",
            "",
        ],
        row("torch.load + load_state_dict", "load: torch.load + load_state_dict"),
        row(
            "fabric.load",
            "load: fabric.load",
            f"{load_ratio:.3f}",
            f"{_paired(case, 'torch.load + load_state_dict', 'fabric.load'):.3f}",
            f">= {THROUGHPUT_GOAL}",
            verdict(load_ratio >= THROUGHPUT_GOAL),
        ),
        row(
            "fabric.save async",
            "async: stall (call returns)",
            f"{stall:.3f}",
            f"{_paired(case, 'fabric.save async', 'fabric.save'):.3f}",
            f"<= {STALL_GOAL}",
            verdict(stall <= STALL_GOAL),
        ),
        row(
            "fabric.save async, written",
            "async: call to file written",
            f"{written:.3f}",
            f"{_paired(case, 'fabric.save async, written', 'fabric.save'):.3f}",
        ),
        row("clone (fresh memory)", "diag: clone every tensor"),
        row("copy_ (reused buffers)", "diag: copy_ into reused buffers"),
    ]
    detail = "{:.3f} vs {:.3f} s"
    results = [
        _common.Result(
            "checkpoint_io",
            f"save, {case.name}",
            "ratio",
            med["fabric.save"] / med["torch.save"],
            round(1 / THROUGHPUT_GOAL, 4),
            detail.format(med["torch.save"], med["fabric.save"]),
        ),
        _common.Result(
            "checkpoint_io",
            f"load, {case.name}",
            "ratio",
            med["fabric.load"] / med["torch.load + load_state_dict"],
            round(1 / THROUGHPUT_GOAL, 4),
            detail.format(med["torch.load + load_state_dict"], med["fabric.load"]),
        ),
        _common.Result(
            "checkpoint_io",
            f"async stall / blocking save, {case.name}",
            "ratio",
            stall,
            STALL_GOAL,
            f"{med['fabric.save async']:.3f} of {med['fabric.save']:.3f} s",
        ),
    ]
    return rows, results


def main(argv: list[str] | None = None) -> list[_common.Result]:
    """Run every case, print the table and return the headline figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", nargs="+", choices=tuple(LAYERS), default=list(LAYERS), help="model sizes (default all)"
    )
    parser.add_argument("--repeats", type=int, default=4, help="timed rounds per case (default 4)")
    parser.add_argument(
        "--adamw",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the 100M model with AdamW state (default on, off with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="only 100M, no AdamW case, 3 rounds")
    parser.add_argument("--dir", help="where to write the files (default: the system's temporary directory)")
    parser.add_argument("--json", help="also write the headline figures to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.adamw = ["100M"], 3, False
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    _common.use_src()
    plan = [(size, size, False) for size in args.sizes]
    if args.adamw and "100M" in args.sizes:
        plan.insert(1, ("100M + AdamW", "100M", True))

    print(f"checkpoint_io: {_common.machine_line()}")
    rows: list[list[str]] = []
    results: list[_common.Result] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="handloom-bench-ckpt-", dir=args.dir) as tmp:
        print(
            f"  {args.repeats} timed rounds per case after 1 warm-up round; files in {tmp};"
            f" Linear({WIDTH}, {WIDTH}) stacks, float32\n",
            flush=True,
        )
        for name, size, with_adamw in plan:
            case = build_case(name, size, with_adamw)
            case.name = f"{name} ({case.nbytes / 1e9:.2f} GB)"
            for index in range(args.repeats + 1):
                run_round(case, Path(tmp), index, record=index > 0)
            case_rows, case_results = report(case)
            rows.extend(case_rows)
            results.extend(case_results)
            print(f"  {case.name}: done after {time.perf_counter() - start:.0f} s", flush=True)
            del case, case_rows
            gc.collect()  # the model, its optimizer and the reused buffers go before the next size
            for path in Path(tmp).iterdir():
                path.unlink()

    headers = ["case", "operation", "median s", "min s", "CPU s", "GB/s", "ratio", "paired", "goal", ""]
    print()
    print(_common.format_table(headers, rows, align="llrrrrrrrl"))
    print(
        "\nsave / load ratio = plain median time / handloom median time (throughput ratio; higher is"
        "\nbetter); stall = median time for fabric.save(async_save=True) to return / median blocking"
        "\nfabric.save; paired = median over rounds of the same ratio within each round; CPU s = median"
        "\nuser + system CPU time of this process (all threads) during the operation; GB/s from the"
        "\nmedian, GB = 1e9 bytes of tensor data. Files are written into the page cache and loads read"
        "\nthem from it; the fsync cost depends on the disk. Other load on the machine makes the figures"
        "\nnoisy: compare min s and CPU s."
        f"\ntotal {time.perf_counter() - start:.0f} s; peak RSS of this process"
        f" {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"
    )
    _common.write_results(args.json, results)
    return results


if __name__ == "__main__":
    main()
