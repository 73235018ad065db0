"""KL divergence to a reference (dense) model: mean per-token KL(p_ref || p_model).

KL to the dense model is the finer signal for a pruned model: perplexity only looks at the true next token,
KL at the whole distribution. The reference is either the model itself (run window by window beside the
compared model: exact) or a :class:`~hf_sparse.evaluation.reference.ReferenceLogprobs` cache (computed once;
a top-k cache gives a slight lower bound, see :mod:`hf_sparse.evaluation.reference`).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .reference import ReferenceLogprobs
from .windows import DeviceLike

__all__ = ["kl_to_reference"]


def _kl_rows(ref_lp: torch.Tensor, ref_ids: Optional[torch.Tensor], model_lp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p_ref || p_model); top-k references compare the (top-k + rest) coarsened distributions."""
    if ref_ids is None:
        return (ref_lp.exp() * (ref_lp - model_lp)).sum(-1)
    model_top = model_lp.gather(-1, ref_ids.long())
    ref_rest = torch.log1p(-ref_lp.exp().sum(-1).clamp(max=1.0 - 1e-7))
    model_rest = torch.log1p(-model_top.exp().sum(-1).clamp(max=1.0 - 1e-7))
    top = (ref_lp.exp() * (ref_lp - model_top)).sum(-1)
    return top + ref_rest.exp() * (ref_rest - model_rest)


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
    # evaluate_lm (scoring.py) computes perplexity and KL in one pass and uses _kl_rows from here, so it is
    # imported at call time to keep the two modules free of an import cycle.
    from .scoring import evaluate_lm

    if reference_model is None:
        raise ValueError("argument `reference_model` is required (a model or ReferenceLogprobs)")
    return evaluate_lm(model, input_ids, reference=reference_model, max_length=max_length, stride=stride,
                       batch_size=batch_size, temperature=temperature, device=device, progress=progress)["kl"]
