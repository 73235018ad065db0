"""Calibration data, shared by one-shot pruning (SparseGPT, Wanda) and GPTQ export: token ids from tensors, id lists,
files or raw text, as batches of ids or as model-input dicts."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Union

import torch

__all__ = [
    "CalibrationIds", "as_batches", "as_model_inputs", "calibration_ids_from_text", "consecutive_windows",
    "load_calibration_ids",
]

CalibrationIds = Union[torch.Tensor, Sequence[torch.Tensor]]


def as_batches(calibration_ids: Optional[CalibrationIds], batch_size: int = 8) -> list[torch.Tensor]:
    """Normalise calibration ids to a list of 2-D LongTensor batches of at most ``batch_size`` rows.

    Accepts a [num_samples, seq_len] tensor, a 1-D tensor (one sequence), or a list of 1-D/2-D tensors (1-D
    sequences of equal length are stacked; 2-D ones are split into ``batch_size`` rows).
    """
    if batch_size < 1:
        raise ValueError(f"argument `batch_size` must be >= 1, got {batch_size}")
    if calibration_ids is None:
        return []
    items = [calibration_ids] if torch.is_tensor(calibration_ids) else list(calibration_ids)
    batches: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        while pending:
            chunk, pending[:] = pending[:batch_size], pending[batch_size:]
            batches.append(torch.stack(chunk))

    for item in items:
        t = torch.as_tensor(item)
        if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"argument `calibration_ids` must hold integer token ids, got dtype {t.dtype}")
        t = t.long()
        if t.dim() == 1:
            if pending and pending[0].shape != t.shape:
                flush()
            pending.append(t)
        elif t.dim() == 2:
            flush()
            batches.extend(t.split(batch_size))
        else:
            raise ValueError(f"argument `calibration_ids`: expected 1-D or 2-D token ids, got shape {tuple(t.shape)}")
    flush()
    return [b for b in batches if b.numel()]


def calibration_ids_from_text(
    tokenizer: Any, texts: Union[str, Iterable[str]], num_samples: int = 32, seq_len: int = 512, seed: int = 0
) -> torch.Tensor:
    """``num_samples`` random windows of ``seq_len`` tokens from the concatenated texts ([num_samples, seq_len]).

    Random windows (fixed ``seed``) like the SparseGPT/Wanda calibration sets, so the samples cover the corpus.
    """
    if isinstance(texts, str):
        texts = [texts]
    sep = getattr(tokenizer, "eos_token", None) or "\n\n"
    ids = tokenizer(sep.join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() <= seq_len:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens, fewer than argument `seq_len`={seq_len}+1; "
            "give more text or a smaller --seq-len"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def consecutive_windows(tokenizer: Any, text: str, num_samples: int, seq_len: int) -> torch.Tensor:
    """The first ``num_samples`` consecutive, non-overlapping ``seq_len``-token windows of ``text`` (what
    ``hf-sparse export --method gptq --calibration-file`` uses)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    chunks = [ids[i : i + seq_len] for i in range(0, ids.numel() - seq_len + 1, seq_len)][:num_samples]
    if not chunks:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than argument `seq_len`={seq_len}")
    return torch.stack(chunks)


def as_model_inputs(calibration_data: Any) -> list[dict[str, torch.Tensor]]:
    """Calibration data as forward-kwargs dicts, one sequence per dict: a [N, L] or 1-D tensor, or a list of tensors
    and/or dicts (e.g. with an ``attention_mask``)."""
    if isinstance(calibration_data, torch.Tensor):
        data = calibration_data if calibration_data.dim() == 2 else calibration_data.unsqueeze(0)
        return [{"input_ids": row.unsqueeze(0)} for row in data]
    out = []
    for item in calibration_data:
        if isinstance(item, torch.Tensor):
            out.append({"input_ids": item if item.dim() == 2 else item.unsqueeze(0)})
        elif isinstance(item, dict):
            out.append(item)
        else:
            raise TypeError(f"argument `calibration_data`: expected tensors or dicts of tensors, got {type(item).__name__}")
    return out


def load_calibration_ids(path: str) -> torch.Tensor | list[torch.Tensor]:
    """Token ids from a file: ``.safetensors`` (tensor ``input_ids``) or ``.json`` (a list of ids, or of id lists).

    Pickle files (``.pt``) are not read: save ids with ``safetensors.torch.save_file({"input_ids": ids}, path)``.
    """
    import json

    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data and isinstance(data[0], int):
            return torch.tensor(data, dtype=torch.long)
        return [torch.tensor(row, dtype=torch.long) for row in data]
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        tensors = load_file(path)
        if "input_ids" not in tensors:
            raise ValueError(f"{path}: a calibration safetensors file holds a tensor named 'input_ids'; found {sorted(tensors)}")
        return tensors["input_ids"]
    raise ValueError(
        f"argument `--calibration-ids-file`={path!r}: give a .safetensors (tensor 'input_ids') or .json file; pickle "
        "files (.pt) are not read"
    )
