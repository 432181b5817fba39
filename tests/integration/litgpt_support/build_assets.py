"""``python build_assets.py ROOT``: everything litgpt needs to run offline, made locally and small.

* ``ROOT/checkpoint``: ``model_config.yaml`` (a 3-layer Llama-style model, 32 wide, 128 tokens of
  context), ``lit_model.pth`` (its freshly initialised weights, seed 0), and a byte-level BPE
  ``tokenizer.json`` trained here on the synthetic text, with ``tokenizer_config.json`` and
  ``generation_config.json`` naming its ``<s>`` and ``</s>`` tokens.
* ``ROOT/text``: ``train.txt`` and ``val.txt`` for pretraining (:mod:`synthetic_data`).
* ``ROOT/sft.json``: a small instruction dataset for litgpt's ``JSON`` data module.
* ``ROOT/pretrain.yaml``: the model's name and config for ``litgpt pretrain --config``.

Three layers because litgpt's adapter starts at layer 2 by default: layer 2 gets the adapter.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
import yaml
from litgpt import GPT, Config
from litgpt.utils import save_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

WORDS = [
    *("the", "a", "loom", "weaves", "thread", "cloth", "warp", "weft", "shuttle", "pattern", "color"),
    *("red", "blue", "green", "long", "short", "fine", "rough", "cotton", "wool", "silk", "linen"),
    *("spins", "pulls", "draws", "makes", "holds", "runs", "over", "under", "across"),
]


ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the"
    " request.\n\n### Instruction:\nRepeat:\n\n### Response:\n"
)


def sentences(rng: random.Random, count: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + "." for _ in range(count)]


def build_tokenizer(texts: list[str], out: Path) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "add_bos_token": False,
            }
        )
    )
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}))


def main(root: Path) -> None:
    rng = random.Random(0)
    checkpoint = root / "checkpoint"
    text = root / "text"
    checkpoint.mkdir(parents=True)
    text.mkdir(parents=True)

    train, val = sentences(rng, 600), sentences(rng, 60)
    (text / "train.txt").write_text(" ".join(train))
    (text / "val.txt").write_text(" ".join(val))
    # litgpt's default (Alpaca) prompt template is part of every finetuning sample: teach it to the
    # tokenizer, so that a sample stays well inside the 128-token context.
    build_tokenizer([*train, *[ALPACA_TEMPLATE] * 20], checkpoint)

    samples = [{"instruction": f"Repeat: {s}", "input": "", "output": s} for s in sentences(rng, 40)]
    (root / "sft.json").write_text(json.dumps(samples))

    config = Config(
        name="handloom-tiny",
        block_size=128,
        vocab_size=384,
        padded_vocab_size=384,
        n_layer=3,
        n_head=4,
        n_query_groups=2,
        n_embd=32,
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP",
        intermediate_size=64,
    )
    save_config(config, checkpoint)
    # `litgpt pretrain --config ROOT/pretrain.yaml` builds the same architecture from scratch.
    model_config = yaml.safe_load((checkpoint / "model_config.yaml").read_text())
    (root / "pretrain.yaml").write_text(
        yaml.safe_dump({"model_name": config.name, "model_config": model_config})
    )
    torch.manual_seed(0)
    torch.save(GPT(config).state_dict(), checkpoint / "lit_model.pth")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
