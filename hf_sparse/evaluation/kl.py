"""The KL term: per-position KL(p_ref || p_model), exact or against a top-k reference.

KL to the dense model is the finer signal for a pruned model: perplexity only looks at the true next token,
KL at the whole distribution. The reference is either the model itself (run window by window beside the
compared model: exact) or a :class:`~hf_sparse.evaluation.reference.ReferenceLogprobs` cache (computed once;
a top-k cache gives a slight lower bound, see :mod:`hf_sparse.evaluation.reference`). The pass over the windows
that sums it is :func:`hf_sparse.evaluation.scoring.kl_to_reference`.
"""

from __future__ import annotations

from typing import Optional

import torch


__all__ = ["kl_rows"]


def kl_rows(ref_lp: torch.Tensor, ref_ids: Optional[torch.Tensor], model_lp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p_ref || p_model); top-k references compare the (top-k + rest) coarsened distributions."""
    if ref_ids is None:
        return (ref_lp.exp() * (ref_lp - model_lp)).sum(-1)
    model_top = model_lp.gather(-1, ref_ids.long())
    ref_rest = torch.log1p(-ref_lp.exp().sum(-1).clamp(max=1.0 - 1e-7))
    model_rest = torch.log1p(-model_top.exp().sum(-1).clamp(max=1.0 - 1e-7))
    top = (ref_lp.exp() * (ref_lp - model_top)).sum(-1)
    return top + ref_rest.exp() * (ref_rest - model_rest)
