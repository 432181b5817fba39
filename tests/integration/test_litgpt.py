"""litgpt 0.5.13 trains, resumes, generates and chats on handloom with only its imports changed.

litgpt runs from its own CLI in subprocesses (``litgpt_support/run_litgpt.py``), with an import
hook that turns its ``lightning.fabric`` imports into ``handloom`` ones and nothing else. A
session fixture builds, once and offline, a tiny model checkpoint, a byte-level BPE tokenizer
trained here, synthetic pretraining text and a small instruction dataset.

One process: pretrain (32-true and litgpt's default bf16-mixed), finetune_full (and its
--resume), finetune_lora, finetune_adapter, generate and chat on handloom log, save and print
exactly what they do on Lightning (same seeds). Two processes: pretrain under litgpt's
FSDPStrategy (default bf16-mixed precision), which Lightning refuses on a CPU, resumes to the
uninterrupted run bit for bit; finetune_lora under its ModelParallelStrategy trains LoRA, leaves
the frozen weights as loaded, and starts with Lightning's loss.

``torch.compile`` is switched off (``TORCHDYNAMO_DISABLE=1``) for time: compiling litgpt's
pretraining model costs about a minute per process on two CPU cores.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("litgpt") is None or importlib.util.find_spec("lightning") is None,
        reason="litgpt (and the lightning it depends on) is not installed: pip install -e '.[test]'",
    ),
]

SUPPORT = Path(__file__).resolve().parent / "litgpt_support"
RUNNER = SUPPORT / "run_litgpt.py"
PROMPT = "the loom weaves"


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("litgpt") / "assets"
    done = subprocess.run(
        [sys.executable, str(SUPPORT / "build_assets.py"), str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def _start(
    cwd: Path, commands: list[list[str]], backend: str, stdin: str | None = None
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "LITGPT_BACKEND": backend,
        "HF_HUB_OFFLINE": "1",
        "TORCHDYNAMO_DISABLE": "1",
        "PYTHONUNBUFFERED": "1",  # stdout and stderr interleave in the order they were written
    }
    argv = [sys.executable, str(RUNNER)]
    for i, command in enumerate(commands):
        argv += (["--next"] if i else []) + command
    stdin_file = cwd / "stdin.txt"
    stdin_file.write_text(stdin or "")
    with open(stdin_file) as handle:
        return subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=handle, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )


def _finish(process: subprocess.Popen[str], timeout: float) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"litgpt ran past {timeout} s:\n{output[-6000:]}")
    if process.returncode != 0:
        pytest.fail(f"litgpt exited with {process.returncode}:\n{output[-6000:]}")
    return output


def _run(cwd: Path, commands: list[list[str]], backend: str = "handloom", timeout: float = 240) -> str:
    return _finish(_start(cwd, commands, backend), timeout)


def _pretrain(assets: Path, out: Path, devices: int, *extra: str) -> list[str]:
    # 6 iterations of 2 sequences of 128 tokens each (one per device on 2 devices); constant
    # learning rate after 2 warm-up iterations; a checkpoint every 3 steps.
    return [
        "pretrain",
        "--config", str(assets / "pretrain.yaml"),
        "--data", "synthetic_data.SyntheticText",
        "--data.data_dir", str(assets / "text"),
        "--tokenizer_dir", str(assets / "checkpoint"),
        "--out_dir", str(out),
        "--devices", str(devices),
        "--train.micro_batch_size", str(2 // devices),
        "--train.global_batch_size", "2",
        "--train.max_tokens", str(6 * 2 * 128),
        "--train.lr_warmup_steps", "2",
        "--train.save_interval", "3",
        "--eval.interval", "1000",
        "--eval.max_iters", "2",
        "--logger_name", "csv",
        *extra,
    ]  # fmt: skip


def _finetune(script: str, assets: Path, out: Path, devices: int = 1, *extra: str) -> list[str]:
    return [
        script,
        str(assets / "checkpoint"),
        "--data", "JSON",
        "--data.json_path", str(assets / "sft.json"),
        "--data.val_split_fraction", "0.1",
        "--data.num_workers", "0",
        "--out_dir", str(out),
        "--devices", str(devices),
        "--precision", "32-true",
        "--train.max_steps", "4",
        "--train.micro_batch_size", str(2 // devices),
        "--train.global_batch_size", "2",
        "--train.save_interval", "2",
        "--train.lr_warmup_steps", "1",
        "--eval.interval", "1000",
        "--eval.max_iters", "2",
        "--logger_name", "csv",
        *extra,
    ]  # fmt: skip


def _rows(out: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in sorted(out.glob("logs/csv/version_*/metrics.csv")):
        with open(path, newline="") as handle:
            rows += csv.DictReader(handle)
    return rows


def _losses(out: Path) -> dict[int, float]:
    """The training loss logged at each iteration (all runs that logged into ``out``)."""
    return {int(row["iter"]): float(row["loss"]) for row in _rows(out) if row.get("loss")}


def _val_loss(out: Path) -> float:
    """The validation loss logged last."""
    return [float(row["val_loss"]) for row in _rows(out) if row.get("val_loss")][-1]


def _generated(output: str) -> list[str]:
    """What ``generate`` and ``chat`` printed as the model's text, run by run."""
    texts, current = [], None
    for line in output.splitlines():
        if line.startswith(("Time to load the model weights", "Now chatting with")):
            current = []
        elif line.startswith("Time for inference") and current is not None:
            texts.append("\n".join(current))
            current = None
        elif current is not None and not line.startswith("Seed set to"):  # Lightning logs its seeding
            current.append(line)
    return texts


def _state(path: Path, *keys: str) -> dict[str, torch.Tensor]:
    """The tensors saved in ``path`` (under ``keys`` only, when given), by their place in it."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return dict(_tensors({key: saved[key] for key in keys} if keys else saved))


def _tensors(value: object, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{prefix}/{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{prefix}/{i}")


def _assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.mark.timeout(600)
def test_one_process_commands_match_lightning_exactly(assets: Path, tmp_path: Path) -> None:
    def step_2(root: Path) -> Path:
        return root / "full" / "step-000002" / "lit_model.pth"

    def commands(root: Path) -> list[list[str]]:
        return [
            _pretrain(assets, root / "pretrain", 1, "--precision", "32-true"),
            _pretrain(assets, root / "pretrain-bf16", 1),  # litgpt's default on a CPU: bf16-mixed
            _finetune("finetune_full", assets, root / "full"),
            # resumed from the checkpoint after step 2 of 4, into another directory
            _finetune("finetune_full", assets, root / "full-resumed", 1, "--resume", str(step_2(root))),
            _finetune("finetune_lora", assets, root / "lora"),
            _finetune("finetune_adapter", assets, root / "adapter"),
            ["generate", str(assets / "checkpoint"), "--prompt", PROMPT, "--max_new_tokens", "12"],
            ["generate", str(root / "full" / "final"), "--prompt", PROMPT, "--max_new_tokens", "12"],
            ["chat", str(root / "lora" / "final"), "--max_new_tokens", "12"],
        ]

    ours, theirs = tmp_path / "handloom", tmp_path / "lightning"
    ours.mkdir()
    theirs.mkdir()
    chat_input = f"{PROMPT}\n\n"  # one prompt, then an empty one ends the chat
    started = time.perf_counter()
    # Both run at once: the imports, most of each run's time, overlap.
    lightning = _start(theirs, commands(theirs), "lightning", stdin=chat_input)
    try:
        ours_out = _finish(_start(ours, commands(ours), "handloom", stdin=chat_input), 420)
        theirs_out = _finish(lightning, 420)
    finally:
        if lightning.poll() is None:
            lightning.kill()
            lightning.communicate()
    print(f"one-process runs took {time.perf_counter() - started:.0f} s")

    for name, iters in (("pretrain", 6), ("pretrain-bf16", 6), ("full", 4), ("lora", 4), ("adapter", 4)):
        losses = _losses(ours / name)
        assert sorted(losses) == list(range(1, iters + 1)), name
        assert all(math.isfinite(loss) for loss in losses.values()), name
        assert losses == _losses(theirs / name), f"{name}: handloom's losses differ from Lightning's"
        assert _val_loss(ours / name) == _val_loss(theirs / name), name
        print(name, losses, "val", _val_loss(ours / name))
    # (pretrain's checkpoint also holds Lightning's pickled DataLoader, which only litgpt can load:
    # its losses above, validation included, stand for its weights)
    for saved in (
        "full/final/lit_model.pth",
        "lora/final/lit_model.pth",
        "adapter/final/lit_model.pth.adapter",
    ):
        _assert_equal_states(_state(ours / saved), _state(theirs / saved))

    texts = _generated(ours_out)
    assert len(texts) == 3, ours_out[-3000:]  # two generate runs and one chat reply
    assert all(text.strip() for text in texts)
    assert texts == _generated(theirs_out)

    # finetune_full resumed after step 2 equals the uninterrupted run: steps 3-4 and final weights.
    resumed = ours / "full-resumed"
    assert _losses(resumed) == _losses(theirs / "full-resumed")
    assert _losses(resumed) == {i: loss for i, loss in _losses(ours / "full").items() if i > 2}
    assert _val_loss(resumed) == _val_loss(ours / "full")
    _assert_equal_states(_state(ours / "full/final/lit_model.pth"), _state(resumed / "final/lit_model.pth"))


@pytest.mark.timeout(600)
def test_fsdp_pretrain_on_two_processes_resumes_exactly(assets: Path, tmp_path: Path) -> None:
    # litgpt picks FSDPStrategy(HYBRID_SHARD, full state dict) for devices > 1 and its default
    # bf16-mixed precision on a CPU; Lightning refuses FSDP without CUDA.
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _run(tmp_path, [_pretrain(assets, whole, 2)])
    checkpoint = whole / "step-00000003" / "lit_model.pth"
    _run(tmp_path, [_pretrain(assets, resumed, 2, "--resume", str(checkpoint))])

    losses = _losses(whole)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(loss) for loss in losses.values())
    assert _losses(resumed) == {i: loss for i, loss in losses.items() if i > 3}
    assert _val_loss(resumed) == _val_loss(whole)
    final = _state(whole / "final/lit_model.pth", "model", "optimizer")
    assert any(key.startswith("/optimizer/state/") for key in final)
    _assert_equal_states(final, _state(resumed / "final/lit_model.pth", "model", "optimizer"))
    print("fsdp", losses)


@pytest.mark.timeout(600)
def test_model_parallel_lora_on_two_processes(assets: Path, tmp_path: Path) -> None:
    # litgpt's finetune_lora picks ModelParallelStrategy(parallelize_fn=fully_shard per layer) for
    # devices > 1 and loads the base weights with DTensor's distribute_tensor.
    out, theirs = tmp_path / "lora", tmp_path / "lightning"
    theirs.mkdir()
    lightning = _start(theirs, [_finetune("finetune_lora", assets, theirs / "lora", 2)], "lightning")
    try:
        _run(tmp_path, [_finetune("finetune_lora", assets, out, 2)])
        _finish(lightning, 240)
    finally:
        if lightning.poll() is None:
            lightning.kill()
            lightning.communicate()

    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(math.isfinite(loss) for loss in losses.values())
    # Lightning runs this on a CPU too. The first step's loss, taken before any LoRA matrix
    # matters (B starts at zero), is Lightning's: same data per rank, same base weights. Later
    # steps differ a little because LoRA's A starts elsewhere: handloom initialises meta-device
    # parameters as one process would, Lightning runs reset_parameters on the DTensor parameters.
    assert losses[1] == _losses(theirs / "lora")[1]
    base = torch.load(assets / "checkpoint" / "lit_model.pth", weights_only=True)
    merged = torch.load(out / "final" / "lit_model.pth", weights_only=True)
    lora = torch.load(out / "final" / "lit_model.pth.lora", weights_only=True)["model"]
    assert merged.keys() == base.keys()
    trained = {key for key in base if ".attn.qkv." in key}  # litgpt's default: LoRA on query and value
    assert trained
    for key in base.keys() - trained:
        assert torch.equal(merged[key], base[key]), f"{key}: a frozen weight changed"
    for key in trained:
        assert not torch.equal(merged[key], base[key]), f"{key}: LoRA did not train"
    assert all(value.abs().sum() > 0 for key, value in lora.items() if key.endswith("lora_B"))
    print("model parallel lora", losses)
