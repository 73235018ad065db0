"""Checksummed safetensors shards of an export (written inside :func:`hf_sparse.atomic.atomic_directory`).

Each safetensors shard carries a content checksum in its ``__metadata__`` so the loader can tell corruption
from a format mismatch. Directory replacement rules (what happens to an existing ``out_dir``) live in
:mod:`hf_sparse.atomic`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors.torch import save_file

from ..atomic import atomic_directory, atomic_write_json, fsync_tree
from ..checksum import tensor_checksum, verify_checksum
from ..format import CHECKSUM_KEY, FORMAT_VERSION, VERSION_KEY

__all__ = ["atomic_directory", "tensor_checksum", "write_shards", "write_json", "verify_checksum", "fsync_tree"]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_shards(
    tensors: Mapping[str, torch.Tensor],
    directory: Path,
    max_shard_bytes: int = 5 * 1024**3,
    fail_after: Optional[int] = None,
) -> list[str]:
    """Write ``tensors`` as ``model.safetensors`` (or numbered shards + index) into ``directory``.

    ``fail_after`` is a test hook: raise after writing that many shards (to test atomicity).
    """
    items = sorted(tensors.items())
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in items:
        if shards[-1] and size + _nbytes(t) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += _nbytes(t)
    names = (
        [SAFE_WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for i, (fname, shard) in enumerate(zip(names, shards)):
        if fail_after is not None and i >= fail_after:
            raise RuntimeError(f"export aborted after {i} shard(s) (test hook)")
        data = {k: v.detach().contiguous().cpu() for k, v in shard}
        meta = {"format": "pt", CHECKSUM_KEY: tensor_checksum(iter(data.items())), VERSION_KEY: str(FORMAT_VERSION)}
        save_file(data, str(directory / fname), metadata=meta)
        weight_map.update({k: fname for k in data})
    if len(shards) > 1:
        total = sum(_nbytes(t) for _, t in items)
        write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, directory / SAFE_WEIGHTS_INDEX_NAME)
    return names


def write_json(obj: object, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_json_atomic(obj: object, path: str | os.PathLike) -> Path:
    """JSON written to a temp file beside ``path`` and renamed over it: readers never see half a file."""
    return atomic_write_json(obj, path)
