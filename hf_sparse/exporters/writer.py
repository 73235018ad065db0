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


def write_shards(
    tensors: Mapping[str, torch.Tensor],
    directory: Path,
    max_shard_bytes: int = 5 * 1024**3,
    fail_after: Optional[int] = None,
) -> list[str]:
    """Write ``tensors`` as ``model.safetensors`` (or numbered shards + index) into ``directory``, each shard with its
    checksum and format version in ``__metadata__``. The split is huggingface_hub's own
    (:func:`huggingface_hub.split_torch_state_dict_into_shards`, what ``save_pretrained`` uses), so shard names and
    the index match every other transformers checkpoint.

    ``fail_after`` is a test hook: raise after writing that many shards (to test atomicity).
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(dict(tensors), max_shard_size=max_shard_bytes)
    for i, (fname, names) in enumerate(sorted(split.filename_to_tensors.items())):
        if fail_after is not None and i >= fail_after:
            raise RuntimeError(f"export aborted after {i} shard(s) (test hook)")
        data = {k: tensors[k].detach().contiguous().cpu() for k in names}
        meta = {"format": "pt", CHECKSUM_KEY: tensor_checksum(iter(data.items())), VERSION_KEY: str(FORMAT_VERSION)}
        save_file(data, str(directory / fname), metadata=meta)
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        write_json(index, directory / SAFE_WEIGHTS_INDEX_NAME)
    return sorted(split.filename_to_tensors)


def write_json(obj: object, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_json_atomic(obj: object, path: str | os.PathLike) -> Path:
    """JSON written to a temp file beside ``path`` and renamed over it: readers never see half a file."""
    return atomic_write_json(obj, path)
