"""Atomic, checksummed writing of an export directory.

An export is written into a temporary directory beside ``out_dir`` (same filesystem), every file is
fsynced, and only then is the directory renamed into place. If anything fails midway the temporary
directory is removed and an earlier export at ``out_dir`` is untouched. Each safetensors shard carries
a content checksum in its ``__metadata__`` so the loader can tell corruption from a format mismatch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .format import CHECKSUM_KEY, FORMAT_VERSION, VERSION_KEY

__all__ = ["atomic_directory", "tensor_checksum", "write_shards", "write_json", "verify_checksum", "fsync_tree"]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (so a crash after the rename cannot expose empty files)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``out_dir``, on error it disappears."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"argument `out_dir`={str(out)!r} exists and is not a directory")
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)  # put the earlier export back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
