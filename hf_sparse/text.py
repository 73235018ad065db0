"""Text in, token ids out: load a text (file, folder or `datasets` dataset) and tokenize it.

Generic helpers with no knowledge of training or evaluation, so both layers (and the demo) build on them:
:mod:`hf_sparse.training.data` cuts the ids into training blocks, :mod:`hf_sparse.evaluation` scores them.
A byte-free character tokenizer lets the tiny CPU recipe and the tests run without any downloaded tokenizer.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

__all__ = ["CharTokenizer", "load_text", "tokenize_text", "tokenize_texts"]


class CharTokenizer:
    """96 symbols: newline and printable ASCII (anything else becomes a space). For tiny models and tests."""

    vocab_size = 96
    pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [0 if c == "\n" else (ord(c) - 31 if 32 <= ord(c) < 127 else 1) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join("\n" if i == 0 else chr(i + 31) for i in ids)


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


def tokenize_texts(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """One 1-D token stream of ``texts``, each document followed by the tokenizer's eos (document boundary)."""
    if isinstance(texts, str):
        raise TypeError("argument `texts` must be a list of strings, got one string (wrap it in a list)")
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenize_text(text, tokenizer))
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.long)
