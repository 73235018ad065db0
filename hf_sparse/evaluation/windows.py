"""Sliding-window forward passes: the engine under perplexity, KL and the reference cache.

Why sliding windows: a long held-out text does not fit one forward pass. Following the transformers docs
("Perplexity of fixed-length models"), windows of ``max_length`` tokens advance by ``stride``; in each window
only the tokens not scored by an earlier window count (labels ``-100`` on the overlap), so every token after
the first is scored exactly once, with up to ``max_length - stride`` tokens of context.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterator, Union

import torch

__all__ = ["DeviceLike", "sliding_windows"]

DeviceLike = Union[str, torch.device, None]


def sliding_windows(n_tokens: int, max_length: int = 512, stride: int = 256) -> list[tuple[int, int, int]]:
    """``(begin, end, n_scored)`` per window, as in the transformers docs.

    Window ``[begin, end)`` scores its last ``n_scored`` tokens (the first window: all but its first token).
    With ``stride < max_length`` every token but the stream's first is scored exactly once; with
    ``stride == max_length`` (no overlap) each window's first token goes unscored, as in the docs' recipe.
    """
    if max_length < 2:
        raise ValueError(f"argument `max_length` must be >= 2, got {max_length}")
    if not 0 < stride <= max_length:
        raise ValueError(f"argument `stride` must be in [1, max_length={max_length}], got {stride}")
    if n_tokens < 2:
        raise ValueError(f"argument `input_ids` needs at least 2 tokens to score, got {n_tokens}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        scored = min(end - prev_end, end - begin - 1)  # a window's first token has no context inside it
        out.append((begin, end, scored))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _as_stream(input_ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"argument `input_ids` must be a 1-D token stream, got shape {tuple(ids.shape)}")
    return ids.long()


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _prepare(model: torch.nn.Module, device: DeviceLike) -> torch.device:
    """Put the model on ``device`` (if given) and return where its inputs go."""
    if device is not None:
        device = torch.device(device)
        if _model_device(model) != device:
            model.to(device)
        return device
    return _model_device(model)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def _window_logits(
    model: torch.nn.Module,
    ids: torch.Tensor,
    max_length: int,
    stride: int,
    batch_size: int,
    device: torch.device,
    progress: bool,
    desc: str,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(logits [n, vocab] float32, targets [n])`` for the scored tokens of each window, in order.

    Full-length windows go through in batches of ``batch_size`` (no padding needed: all have the same length);
    the shorter last window goes alone. Only the logits of scored positions are computed when the model
    supports ``logits_to_keep`` (saves the lm_head on the overlap).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"argument `batch_size` must be >= 1, got {batch_size}")
    windows = sliding_windows(ids.numel(), max_length, stride)
    keep_ok = _accepts_logits_to_keep(model)
    groups: list[list[tuple[int, int, int]]] = []
    for win in windows:
        if groups and len(groups[-1]) < batch_size and (groups[-1][0][1] - groups[-1][0][0]) == win[1] - win[0] \
                and groups[-1][0][0] > 0 and win[0] > 0:
            groups[-1].append(win)
        else:
            groups.append([win])
    bar = tqdm(total=len(windows), desc=desc, unit="win", disable=not progress, leave=False)
    try:
        for group in groups:
            batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            scored = group[0][2]  # same for every window of a group (first window is alone)
            kwargs = {"logits_to_keep": scored + 1} if keep_ok else {}
            logits = model(input_ids=batch, **kwargs).logits
            logits = logits[:, -(scored + 1) : -1, :].float()
            targets = batch[:, -scored:]
            for row in range(len(group)):
                yield logits[row], targets[row]
            bar.update(len(group))
    finally:
        bar.close()


class _EvalMode:
    """``torch.no_grad`` + ``eval()`` for the block, restoring the previous training flags afterwards."""

    def __init__(self, *models: torch.nn.Module) -> None:
        self.models = models

    def __enter__(self) -> None:
        self.flags = [m.training for m in self.models]
        self.grad = torch.no_grad()
        self.grad.__enter__()
        for m in self.models:
            m.eval()

    def __exit__(self, *exc: Any) -> None:
        for m, flag in zip(self.models, self.flags):
            m.train(flag)
        self.grad.__exit__(*exc)
