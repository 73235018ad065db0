"""Content checksums of safetensors shards: part of the on-disk format, read by the loader, written by the exporter.

A sha256 over ``name|dtype|shape|bytes`` of a shard's tensors in name order (independent of the file's byte layout),
stored in the shard's ``__metadata__`` under :data:`hf_sparse.format.CHECKSUM_KEY`.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterator, Optional

import torch
from safetensors import safe_open

from .format import CHECKSUM_KEY

__all__ = ["tensor_checksum", "verify_checksum"]


def tensor_checksum(named: Iterator[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of tensors in name order: independent of the file layout."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda kv: kv[0]):
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def verify_checksum(path: str | os.PathLike) -> Optional[bool]:
    """True/False when the shard carries an hf_sparse checksum, None when it has none. Reads one tensor at a time."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        expected = meta.get(CHECKSUM_KEY)
        if expected is None:
            return None
        keys = sorted(f.keys())
        h = hashlib.sha256()
        for name in keys:
            t = f.get_tensor(name)
            h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            del t
    return h.hexdigest() == expected
