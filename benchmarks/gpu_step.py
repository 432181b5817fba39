"""GPU step time of a GPT-2-small-sized model in ``bf16-mixed``: handloom against plain PyTorch (and
Lightning Fabric and HF Accelerate when they are installed), with MFU.

Needs a CUDA device; on a machine without one it prints that and exits 0 (it is not part of
``run_all.py``, which runs on the CPU).

The model is ``transformers.GPT2LMHeadModel(GPT2Config())`` (124M parameters, 12 layers, width
768, context 1024), built from its config: no weights are downloaded. Every runner gets an
identical copy of the model and the same batches (``--batch-size`` sequences of 1024 synthetic
tokens) and trains with fused AdamW:

* ``plain``: ``model.cuda()``, the forward pass under ``torch.autocast("cuda", torch.bfloat16)``,
  ``loss.backward()``, ``optimizer.step()``.
* ``handloom``: ``Fabric(accelerator="cuda", devices=1, precision="bf16-mixed")``, ``fabric.setup``,
  ``fabric.backward``.
* ``lightning`` / ``accelerate``: the same loop through ``lightning.fabric.Fabric`` and
  ``accelerate.Accelerator(mixed_precision="bf16")``, when importable.

Blocks of ``--block`` steps alternate between the runners (the order rotates every round) after
``--warmup`` untimed steps each; a block is timed with ``torch.cuda.synchronize()`` on both ends.
The figure is the median step time per runner; ratios are to ``plain`` (goal for handloom <= 1.01).
MFU uses the usual decoder estimate of model FLOPs per token, ``6 * N + 12 * layers * width *
context`` (N = non-embedding parameters), and the dense bf16 peak of the device from
``handloom.utilities.get_available_flops``.

Run: ``.venv/bin/python benchmarks/gpu_step.py [--batch-size 8] [--rounds 10] [--block 5] [--compile]``
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
from collections.abc import Callable, Iterator
from typing import Any

import _common
import torch

GOAL = 1.01
CONTEXT = 1024

Step = Callable[[], None]


def build_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_positions=CONTEXT))


def batches(batch_size: int, vocab: int, device: torch.device) -> Iterator[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(1)
    pool = [torch.randint(0, vocab, (batch_size, CONTEXT), device=device, generator=gen) for _ in range(8)]
    index = 0
    while True:
        yield pool[index % len(pool)]
        index += 1


def loss_of(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def plain_runner(model: torch.nn.Module, data: Iterator[torch.Tensor], compile_model: bool) -> Step:
    model = model.cuda()
    forward: Any = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        tokens = next(data)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward(input_ids=tokens).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def fabric_runner(
    fabric_class: Any, model: torch.nn.Module, data: Iterator[torch.Tensor], compile_model: bool
) -> Step:
    """The loop through a Fabric class: handloom's, or Lightning's (the same API)."""
    fabric = fabric_class(accelerator="cuda", devices=1, precision="bf16-mixed")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    module: Any = torch.compile(model) if compile_model else model
    module, optimizer = fabric.setup(module, optimizer)

    def step() -> None:
        loss = loss_of(module, next(data))
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def handloom_runner(model: torch.nn.Module, data: Iterator[torch.Tensor], compile_model: bool) -> Step:
    from handloom import Fabric

    return fabric_runner(Fabric, model, data, compile_model)


def lightning_runner(model: torch.nn.Module, data: Iterator[torch.Tensor], compile_model: bool) -> Step:
    from lightning.fabric import Fabric

    return fabric_runner(Fabric, model, data, compile_model)


def accelerate_runner(model: torch.nn.Module, data: Iterator[torch.Tensor], compile_model: bool) -> Step:
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="bf16")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    module: Any = torch.compile(model) if compile_model else model
    module, optimizer = accelerator.prepare(module, optimizer)

    def step() -> None:
        loss = loss_of(module, next(data))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


RUNNERS: dict[str, Callable[[torch.nn.Module, Iterator[torch.Tensor], bool], Step]] = {
    "plain": plain_runner,
    "handloom": handloom_runner,
    "lightning": lightning_runner,
    "accelerate": accelerate_runner,
}
OPTIONAL = {"lightning": "lightning", "accelerate": "accelerate"}


def model_flops_per_step(model: torch.nn.Module, batch_size: int) -> float:
    config = model.config  # type: ignore[attr-defined]
    embedding = sum(
        p.numel() for name, p in model.named_parameters() if name.endswith(("wte.weight", "wpe.weight"))
    )
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    per_token = 6 * non_embedding + 12 * config.n_layer * config.n_embd * CONTEXT
    return float(per_token * batch_size * CONTEXT)


def peak_bf16_flops(device: torch.device) -> float | None:
    try:
        from handloom.utilities import get_available_flops
    except ImportError:
        return None
    return get_available_flops(device, torch.bfloat16)


def timed_block(step: Step, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in every runner")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_step: no CUDA device here; nothing measured.")
        return 0
    _common.use_src()
    device = torch.device("cuda", 0)
    names = [n for n in RUNNERS if n not in OPTIONAL or importlib.util.find_spec(OPTIONAL[n]) is not None]
    base = build_model()
    flops = model_flops_per_step(base, args.batch_size)
    vocab = base.config.vocab_size  # type: ignore[attr-defined]
    steps = {
        name: RUNNERS[name](copy.deepcopy(base), batches(args.batch_size, vocab, device), args.compile)
        for name in names
    }
    del base
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            times[name].append(timed_block(steps[name], args.block))
    peak = peak_bf16_flops(device)
    medians = {name: _common.median(values) for name, values in times.items()}
    rows = []
    for name in names:
        mfu = f"{flops / medians[name] / peak:.3f}" if peak else "n/a"
        rows.append([name, f"{medians[name] * 1e3:.1f} ms", f"{medians[name] / medians['plain']:.4f}", mfu])
    print(f"gpu_step: {torch.cuda.get_device_name(device)}, {_common.machine_line()}")
    print(f"  GPT-2 small, bf16-mixed, batch {args.batch_size} x {CONTEXT} tokens, compile={args.compile}")
    print(_common.format_table(["runner", "median step", "ratio to plain", "MFU"], rows))
    ratio = medians["handloom"] / medians["plain"]
    result = _common.Result(
        "gpu_step",
        f"GPT-2 small bf16-mixed on {torch.cuda.get_device_name(device)}",
        "ratio",
        ratio,
        GOAL,
        f"{medians['handloom'] * 1e3:.1f} vs {medians['plain'] * 1e3:.1f} ms",
    )
    _common.write_results(args.json, [result])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
