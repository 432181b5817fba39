"""A litgpt pretraining data module over two local text files, with no download and no litdata.

``--data synthetic_data.SyntheticText --data.data_dir DIR`` reads ``DIR/train.txt`` and
``DIR/val.txt``, tokenizes each once, and cuts the tokens into blocks of ``max_seq_length + 1``
(inputs and their shifted targets), as litgpt's ``TextFiles`` does through litdata. The training
loader shuffles with the global torch generator, so the seed litgpt sets decides the order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from litgpt.data import DataModule
from litgpt.tokenizer import Tokenizer
from torch.utils.data import DataLoader, TensorDataset


@dataclass
class SyntheticText(DataModule):
    """Fixed-length token blocks from ``data_dir/train.txt`` and ``data_dir/val.txt``."""

    data_dir: Path
    tokenizer: Tokenizer | None = field(default=None, init=False, repr=False)
    batch_size: int = field(default=1, init=False, repr=False)
    seq_length: int = field(default=-1, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__init__()

    def connect(
        self, tokenizer: Tokenizer | None = None, batch_size: int = 1, max_seq_length: int = -1
    ) -> None:
        if tokenizer is None:
            raise ValueError("SyntheticText needs a tokenizer: pass --tokenizer_dir")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seq_length = max_seq_length + 1

    def _blocks(self, split: str) -> TensorDataset:
        assert self.tokenizer is not None
        text = (Path(self.data_dir) / f"{split}.txt").read_text()
        ids = self.tokenizer.encode(text, bos=False, eos=False).long()
        count = ids.numel() // self.seq_length
        return TensorDataset(ids[: count * self.seq_length].view(count, self.seq_length))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self._blocks("train"), batch_size=self.batch_size, shuffle=True, drop_last=True, collate_fn=_stack
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._blocks("val"), batch_size=self.batch_size, shuffle=False, collate_fn=_stack)


def _stack(items: list[tuple[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([item[0] for item in items])
