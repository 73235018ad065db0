"""Scoring a model on a token stream: sliding-window perplexity and, with a reference, KL in ONE pass.

:func:`evaluate_lm` is the one pass; :func:`perplexity` and :func:`kl_to_reference`
read one number of it.

The windowing (every token after the first scored exactly once, up to ``max_length - stride`` tokens of
context) is in :mod:`hf_sparse.evaluation.windows`; the KL term in :mod:`hf_sparse.evaluation.kl`.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .kl import kl_rows
from .reference import ReferenceLogprobs
from .windows import DeviceLike, _as_stream, _EvalMode, _prepare, _window_logits

__all__ = ["evaluate_lm", "kl_to_reference", "perplexity"]


def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_length: int = 512,
    stride: int = 256,
    batch_size: int = 4,
    device: DeviceLike = None,
    progress: bool = True,
) -> float:
    """Sliding-window perplexity of ``model`` on a 1-D token stream: exp(mean NLL over every scored token)."""
    return evaluate_lm(model, input_ids, max_length=max_length, stride=stride, batch_size=batch_size,
                       device=device, progress=progress)["perplexity"]


def evaluate_lm(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    reference: Union[torch.nn.Module, ReferenceLogprobs, None] = None,
    max_length: int = 512,
    stride: int = 256,
    batch_size: int = 4,
    temperature: float = 1.0,
    device: DeviceLike = None,
    progress: bool = True,
) -> dict[str, float]:
    """Perplexity and (with ``reference``) mean per-token KL(p_ref || p_model) from ONE pass of ``model``.

    ``reference`` is a model (run window by window beside ``model``: exact) or a :class:`ReferenceLogprobs`.
    Returns ``{"perplexity", "nll", "tokens"}`` plus ``"kl"`` when a reference is given.
    """
    ids = _as_stream(input_ids)
    dev = _prepare(model, device)
    ref_iter = None
    cache: Optional[ReferenceLogprobs] = None
    models = [model]
    if isinstance(reference, ReferenceLogprobs):
        cache = reference
        cache.check_matches(ids, max_length, stride, temperature)
    elif reference is not None:
        if not isinstance(reference, torch.nn.Module):
            raise TypeError(f"argument `reference` must be a model or ReferenceLogprobs, got {type(reference)}")
        ref_dev = _prepare(reference, device if device is not None else dev)
        models.append(reference)
        ref_iter = _window_logits(reference, ids, max_length, stride, batch_size, ref_dev, False, "reference")
    nll, kl, count = 0.0, 0.0, 0
    with _EvalMode(*models):
        for logits, targets in _window_logits(model, ids, max_length, stride, batch_size, dev, progress, "eval"):
            nll += F.cross_entropy(logits, targets, reduction="sum").item()
            n = targets.numel()
            if reference is not None:
                model_lp = torch.log_softmax(logits / temperature, dim=-1)
                if cache is not None:
                    ref_lp = cache.logprobs[count : count + n].to(model_lp.device)
                    ref_ids = None if cache.token_ids is None else cache.token_ids[count : count + n].to(model_lp.device)
                else:
                    ref_logits, _ = next(ref_iter)
                    ref_lp, ref_ids = torch.log_softmax(ref_logits.to(model_lp.device) / temperature, dim=-1), None
                kl += kl_rows(ref_lp, ref_ids, model_lp).sum().item()
            count += n
    out = {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}
    if reference is not None:
        out["kl"] = kl / count
    return out


def kl_to_reference(
    model: torch.nn.Module,
    reference_model: Union[torch.nn.Module, ReferenceLogprobs],
    input_ids: torch.Tensor,
    max_length: int = 512,
    stride: int = 256,
    temperature: float = 1.0,
    batch_size: int = 4,
    device: DeviceLike = None,
    progress: bool = True,
) -> float:
    """Mean per-token KL(p_ref || p_model) over the sliding windows (0 when the model equals the reference).

    ``reference_model``: the dense model (exact), or a :class:`ReferenceLogprobs` from :func:`reference_logprobs`
    (computed once, reused for every compared model).
    """
    if reference_model is None:
        raise ValueError("argument `reference_model` is required (a model or ReferenceLogprobs)")
    return evaluate_lm(model, input_ids, reference=reference_model, max_length=max_length, stride=stride,
                       batch_size=batch_size, temperature=temperature, device=device, progress=progress)["kl"]
