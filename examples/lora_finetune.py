"""Fine-tune a Llama model with LoRA adapters (Hugging Face ``peft``) under DDP: the article's snippet.

The article loads ``meta-llama/Llama-3.2-3B``; here the same architecture is built from a tiny
``transformers.LlamaConfig`` (hidden size 64, 2 layers, 4 heads, vocabulary 128) so that nothing
is downloaded and two CPU processes fine-tune it in seconds. ``peft`` wraps the model with LoRA
adapters on the attention's ``q_proj`` and ``v_proj``; only those adapters require gradients, so
only they go to the optimizer, get averaged by DDP and change. The task is synthetic: sequences
that count up from a random token.

At the end only the adapter weights are saved, with
``fabric.save(path, {"model": model}, filter={"model": lambda k, v: "lora" in k})``: a file of a
few kilobytes next to a base model that is never copied. The script reloads that file into a
freshly built base model to show that base + adapter reproduce the fine-tuned model.

Run it either way::

    python examples/lora_finetune.py
    handloom run --accelerator cpu --devices 2 --strategy ddp examples/lora_finetune.py --steps 60

The last line printed is machine readable: ``FINAL {"trainable_params": ..., "adapter": ..., ...}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from handloom import Fabric
from handloom.utilities import progress_bar

# Used when the script launches itself; under `handloom run` the launcher's flags decide instead.
STANDALONE_DEFAULTS = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per process and step")
    parser.add_argument("--seq-len", type=int, default=32)
    # The article's 2e-4 suits a pretrained 3B model; adapters on a tiny random model need more.
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (the article uses 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where the adapter goes (default: a new temporary directory)",
    )
    fabric_group = parser.add_argument_group("Fabric (under `handloom run`, the launcher's flags apply)")
    fabric_group.add_argument("--accelerator", default=None, help="default: cpu")
    fabric_group.add_argument("--devices", type=int, default=None, help="default: 2")
    fabric_group.add_argument("--strategy", default=None, help="default: ddp")
    fabric_group.add_argument("--precision", default=None, help="default: 32-true (the article: bf16-mixed)")
    return parser.parse_args(argv)


def build_fabric(args: argparse.Namespace) -> Fabric:
    """Create Fabric from the flags given here; ``handloom run`` supplies the ones left out."""
    options = {
        "accelerator": args.accelerator,
        "devices": args.devices,
        "strategy": args.strategy,
        "precision": args.precision,
    }
    if os.environ.get("HANDLOOM_CLI_USED") != "1":
        options = {
            name: STANDALONE_DEFAULTS.get(name) if value is None else value for name, value in options.items()
        }
    return Fabric(**{name: value for name, value in options.items() if value is not None})


class CountingTokens(Dataset[dict[str, torch.Tensor]]):
    """Sequences ``s, s+1, s+2, ...`` (mod vocabulary) as ``{"input_ids", "labels"}`` samples."""

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(vocab_size, (num_samples, 1), generator=generator)
        self.tokens = (starts + torch.arange(seq_len)) % vocab_size

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        # The model shifts the labels itself: labels == input_ids for causal language modelling.
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def build_base_model(seed: int) -> LlamaForCausalLM:
    """A tiny Llama, the stand-in for ``AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-3B")``."""
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        # Llama's 0.02 suits a hidden size in the thousands; 1/sqrt(64) gives this one usable logits.
        initializer_range=64**-0.5,
    )
    torch.manual_seed(seed)  # every process, and the reload below, builds the same "pretrained" weights
    return LlamaForCausalLM(config)


def add_lora(base_model: LlamaForCausalLM, rank: int) -> PeftModel:
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.05,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base_model, lora_config)


@torch.no_grad()
def evaluate(model: Any, batch: dict[str, torch.Tensor]) -> float:
    model.eval()
    loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    model.train()
    return float(loss)


def output_dir(fabric: Fabric, requested: Path | None) -> Path:
    """``requested``, or one temporary directory that rank 0 creates and shares with the others."""
    if requested is not None:
        return requested
    created = tempfile.mkdtemp(prefix="lora_finetune_") if fabric.is_global_zero else None
    return Path(fabric.broadcast(created))


def main(args: argparse.Namespace) -> None:
    fabric = build_fabric(args)
    fabric.launch()
    fabric.seed_everything(args.seed)

    # Load base model and wrap with LoRA
    model = add_lora(build_base_model(args.seed), args.rank)
    if fabric.is_global_zero:
        model.print_trainable_parameters()
    trainable_params, all_params = model.get_nb_trainable_parameters()
    # Only trainable params go to optimizer
    optimizer = torch.optim.AdamW(filter(lambda p: p.requires_grad, model.parameters()), lr=args.lr)
    model, optimizer = fabric.setup(model, optimizer)

    vocab_size = model.config.vocab_size
    dataset = CountingTokens(
        args.steps * args.batch_size * fabric.world_size, args.seq_len, vocab_size, args.seed
    )
    train_loader = fabric.setup_dataloaders(DataLoader(dataset, batch_size=args.batch_size, shuffle=True))
    eval_batch = fabric.to_device(
        next(iter(DataLoader(CountingTokens(64, args.seq_len, vocab_size, args.seed + 1), 64)))
    )
    initial_eval_loss = evaluate(model, eval_batch)
    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}

    losses: list[float] = []
    for step, batch in enumerate(progress_bar(train_loader, fabric, desc="fine-tuning")):
        input_ids = batch["input_ids"]
        labels = batch["labels"]
        outputs = model(input_ids=input_ids, labels=labels)
        fabric.backward(outputs.loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(fabric.all_reduce(outputs.loss.detach(), reduce_op="mean").item())
        if step % 10 == 0 or step == len(train_loader) - 1:
            fabric.print(f"step {step:3d} | loss {losses[-1]:.4f}")
    eval_loss = evaluate(model, eval_batch)
    base_unchanged = all(
        torch.equal(p, frozen_before[name]) for name, p in model.named_parameters() if name in frozen_before
    )

    # Save only the adapter: the filter keeps the state-dict entries whose names contain "lora".
    path = output_dir(fabric, args.output_dir) / "adapter.ckpt"
    fabric.save(path, {"model": model}, filter={"model": lambda k, v: "lora" in k})  # on every rank

    # Base weights from their source + the adapter file = the fine-tuned model.
    restored = fabric.to_device(add_lora(build_base_model(args.seed), args.rank))
    fabric.load(path, {"model": restored}, strict=False)  # strict=False: the file holds only the adapter
    restored_eval_loss = evaluate(restored, eval_batch)
    fabric.print(
        f"eval loss {initial_eval_loss:.4f} -> {eval_loss:.4f}; base + adapter from {path}:"
        f" {restored_eval_loss:.4f}"
    )

    result = {
        "trainable_params": trainable_params,
        "all_params": all_params,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "initial_loss_bound": math.log(vocab_size),
        "initial_eval_loss": initial_eval_loss,
        "eval_loss": eval_loss,
        "restored_eval_loss": restored_eval_loss,
        "base_weights_unchanged": base_unchanged,
        "steps": len(losses),
        "adapter": str(path),
        "world_size": fabric.world_size,
    }
    fabric.print("FINAL " + json.dumps(result))


if __name__ == "__main__":
    main(parse_args())
