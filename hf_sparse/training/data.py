"""Training data for recipes: text from a local file or a `datasets` dataset, cut into fixed-length blocks.

Fixed-length blocks of real text (no padding) are what AST's distillation runs use; a byte-free character
tokenizer lets the tiny CPU recipe and the tests run without any downloaded tokenizer.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

__all__ = ["CharTokenizer", "TextBlocks", "load_text", "tokenize_text"]


class CharTokenizer:
    """96 symbols: newline and printable ASCII (anything else becomes a space). For tiny models and tests."""

    vocab_size = 96
    pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [0 if c == "\n" else (ord(c) - 31 if 32 <= ord(c) < 127 else 1) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join("\n" if i == 0 else chr(i + 31) for i in ids)


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


def load_text(source: str, *, config: Optional[str] = None, split: str = "train", text_column: str = "text",
              max_chars: Optional[int] = None) -> str:
    """Text of a local file (or every ``*.txt``/``*.md`` under a folder), else of a `datasets` dataset."""
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            text = f.read(max_chars) if max_chars else f.read()
        return text
    if os.path.isdir(source):
        parts = []
        for root, _, files in sorted(os.walk(source)):
            for name in sorted(files):
                if name.endswith((".txt", ".md")):
                    with open(os.path.join(root, name), encoding="utf-8") as f:
                        parts.append(f.read())
        if not parts:
            raise ValueError(f"data `path`={source!r} is a folder without .txt/.md files")
        text = "\n\n".join(parts)
        return text[:max_chars] if max_chars else text
    try:
        import datasets
    except ImportError as err:
        raise ValueError(
            f"data `path`={source!r} is not a local file or folder, and `datasets` is not installed to load it "
            "from the Hub (pip install datasets)"
        ) from err
    ds = datasets.load_dataset(source, config, split=split)
    if text_column not in ds.column_names:
        raise ValueError(f"dataset {source!r} has no column `text_column`={text_column!r} (has {ds.column_names})")
    out, size = [], 0
    for row in ds:
        out.append(row[text_column])
        size += len(row[text_column])
        if max_chars and size >= max_chars:
            break
    text = "\n\n".join(out)
    return text[:max_chars] if max_chars else text


def tokenize_text(text: str, tokenizer: Any) -> list[int]:
    """Token ids of ``text`` with a HF tokenizer (no special tokens; long texts go through in 1 MB pieces)."""
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode(text)
    ids: list[int] = []
    piece = 1 << 20
    for start in range(0, len(text), piece):
        ids.extend(tokenizer(text[start : start + piece], add_special_tokens=False)["input_ids"])
    return ids


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
