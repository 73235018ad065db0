"""Training data for recipes: text from a local file or a `datasets` dataset, cut into fixed-length blocks.

Fixed-length blocks of real text (no padding) are what AST's distillation runs use. Loading and tokenizing
text (``load_text``, ``tokenize_text``, the byte-free ``CharTokenizer`` for the tiny CPU recipe and the tests)
live in :mod:`hf_sparse.text`, shared with evaluation; they are re-exported here.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from ..text import CharTokenizer, load_text, tokenize_text

__all__ = ["CharTokenizer", "TextBlocks", "load_text", "tokenize_text"]


class TextBlocks(Dataset):
    """Consecutive ``block_size`` token windows; each item has ``input_ids``, ``attention_mask``, ``labels``."""

    def __init__(self, ids: list[int] | torch.Tensor, block_size: int, max_blocks: Optional[int] = None) -> None:
        ids = torch.as_tensor(ids, dtype=torch.long)
        count = ids.numel() // block_size
        if count == 0:
            raise ValueError(f"text has {ids.numel()} tokens, fewer than argument `block_size`={block_size}")
        if max_blocks is not None:
            count = min(count, max_blocks)
        self.blocks = ids[: count * block_size].view(count, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        block = self.blocks[i]
        return {"input_ids": block, "attention_mask": torch.ones_like(block), "labels": block.clone()}


class StreamingTextBlocks(torch.utils.data.IterableDataset):
    """Blocks tokenized on the fly from a streaming `datasets` dataset (corpora too large to hold in memory)."""

    def __init__(self, source: str, tokenizer: Any, block_size: int, *, config: Optional[str] = None,
                 split: str = "train", text_column: str = "text", shuffle_buffer: int = 0, seed: int = 0) -> None:
        self.source, self.tokenizer, self.block_size = source, tokenizer, block_size
        self.config, self.split, self.text_column = config, split, text_column
        self.shuffle_buffer, self.seed = shuffle_buffer, seed

    def __iter__(self):
        import datasets

        ds = datasets.load_dataset(self.source, self.config, split=self.split, streaming=True)
        if self.shuffle_buffer:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        buffer: list[int] = []
        eos = getattr(self.tokenizer, "eos_token_id", None)
        for row in ds:
            buffer.extend(tokenize_text(row[self.text_column], self.tokenizer))
            if eos is not None:
                buffer.append(eos)
            while len(buffer) >= self.block_size:
                block = torch.tensor(buffer[: self.block_size], dtype=torch.long)
                del buffer[: self.block_size]
                yield {"input_ids": block, "attention_mask": torch.ones_like(block), "labels": block.clone()}
