"""Checkpoint folders of a Trainer run: which are complete, which hold finite weights, and the atomic commit.

``ASTTrainer`` writes each checkpoint into ``_checkpoint-N.tmp/checkpoint-N`` and renames it into place when complete
(:func:`commit_checkpoint`); resume picks :func:`last_complete_checkpoint`, the NaN guard names
:func:`last_intact_checkpoint`, and :func:`clean_interrupted_checkpoints` removes what a killed save left.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Optional

import torch
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

__all__ = [
    "checkpoint_is_finite", "clean_interrupted_checkpoints", "commit_checkpoint", "is_complete_checkpoint",
    "last_complete_checkpoint", "last_intact_checkpoint",
]

_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_STAGING_RE = re.compile(rf"^_({PREFIX_CHECKPOINT_DIR}-\d+)\.(tmp|old)$")
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_DCP_MODEL_RE = re.compile(r"^pytorch_model_fsdp_\d+$")  # accelerate's sharded (FSDP2) model state
_DCP_METADATA = ".metadata"  # torch.distributed.checkpoint writes it last, once every rank's shard is in


def _is_complete_dcp(folder: str) -> bool:
    """A ``torch.distributed.checkpoint`` folder whose ``.metadata`` exists and names only shard files present."""
    from torch.distributed.checkpoint import FileSystemReader

    if not os.path.isfile(os.path.join(folder, _DCP_METADATA)):
        return False
    try:
        metadata = FileSystemReader(folder).read_metadata()
        files = {info.relative_path for info in (metadata.storage_data or {}).values()}
    except Exception:  # noqa: BLE001 - truncated/corrupt metadata: not complete
        return False
    return bool(files) and all(os.path.isfile(os.path.join(folder, f)) for f in files)


def is_complete_checkpoint(path: str) -> bool:
    """A Trainer checkpoint folder with a readable ``trainer_state.json`` and its model or adapter weights (all
    shards of a sharded one; under FSDP2 the sharded ``pytorch_model_fsdp_0/`` and ``optimizer_0/``). The Trainer
    writes the state last, so a save killed midway fails this test."""
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    if any(os.path.isfile(os.path.join(path, n)) and os.path.getsize(os.path.join(path, n)) for n in _WEIGHT_FILES):
        return True
    dcp = [e for e in os.listdir(path) if _DCP_MODEL_RE.match(e) and os.path.isdir(os.path.join(path, e))]
    if dcp:
        optimizers = [os.path.join(path, e) for e in os.listdir(path) if re.match(r"^optimizer_\d+$", e)]
        return all(_is_complete_dcp(os.path.join(path, e)) for e in dcp) and all(map(_is_complete_dcp, optimizers))
    for index in _INDEX_FILES:
        try:
            with open(os.path.join(path, index), encoding="utf-8") as f:
                shards = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        return bool(shards) and all(os.path.isfile(os.path.join(path, s)) for s in shards)
    return False


def checkpoint_is_finite(path: str) -> bool:
    """Every floating tensor of the checkpoint's ``*.safetensors`` files is finite; an unreadable file counts as not
    finite. Reads one tensor at a time, safetensors only (no pickle: ``*.bin`` weights are not inspected)."""
    from safetensors import safe_open

    try:
        for name in sorted(os.listdir(path)):
            if not name.endswith(".safetensors"):
                continue
            with safe_open(os.path.join(path, name), framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        return False
    except Exception:  # noqa: BLE001 - truncated/corrupt file: not an intact checkpoint
        return False
    return True


def _checkpoints_newest_first(folder: str) -> list[str]:
    found = []
    for entry in os.listdir(folder):
        match = _CHECKPOINT_RE.match(entry)
        if match and os.path.isdir(os.path.join(folder, entry)):
            found.append((int(match.group(1)), os.path.join(folder, entry)))
    return [path for _, path in sorted(found, reverse=True)]


def last_complete_checkpoint(folder: str) -> Optional[str]:
    """The newest ``checkpoint-N`` in ``folder`` that :func:`is_complete_checkpoint` accepts (what resume uses:
    unlike ``transformers.trainer_utils.get_last_checkpoint`` it skips empty and half-written folders)."""
    for path in _checkpoints_newest_first(folder):
        if is_complete_checkpoint(path):
            return path
        logger.warning("skipping incomplete checkpoint %s (no trainer_state.json or no weights)", path)
    return None


def last_intact_checkpoint(folder: str) -> Optional[str]:
    """The newest ``checkpoint-N`` in ``folder`` that is complete and holds only finite tensors."""
    for path in _checkpoints_newest_first(folder):
        if is_complete_checkpoint(path) and checkpoint_is_finite(path):
            return path
    return None


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def clean_interrupted_checkpoints(folder: str) -> None:
    """Remove what a killed checkpoint save left in ``folder`` (``_checkpoint-N.tmp``, ``_checkpoint-N.old``).

    Only these names, which ASTTrainer alone writes, are touched. A kill between the two renames of a replacement
    (``checkpoint-N`` moved to ``_checkpoint-N.old``, the new one not yet in place) is recovered: the new, complete
    one is moved into place (or else the old one is put back).
    """
    for entry in sorted(os.listdir(folder)):  # "_checkpoint-N.old" before "_checkpoint-N.tmp"
        match = _STAGING_RE.match(entry)
        path = os.path.join(folder, entry)
        if match is None or not os.path.isdir(path):
            continue
        name, kind = match.groups()
        final = os.path.join(folder, name)
        if kind == "old" and not os.path.lexists(final):
            staged = os.path.join(folder, f"_{name}.tmp", name)
            if not is_complete_checkpoint(staged):
                os.rename(path, final)
                continue
            os.rename(staged, final)
        logger.info("removing %s left by an interrupted checkpoint save", path)
        shutil.rmtree(path, ignore_errors=True)


def commit_checkpoint(staged: str, final: str) -> None:
    """Rename the complete ``staged`` folder to ``final`` (an existing one of the same step is replaced)."""
    staging = os.path.dirname(staged)
    if os.path.lexists(final):  # e.g. an incomplete checkpoint-N that resume skipped, or an earlier run's
        old = os.path.join(os.path.dirname(final), f"_{os.path.basename(final)}.old")
        if os.path.lexists(old):
            _remove(old)
        os.rename(final, old)
        os.rename(staged, final)
        _remove(old)
    else:
        os.rename(staged, final)
    os.rmdir(staging)
