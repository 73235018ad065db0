"""Backward-compatible import path: the language-model quality checks now live in :mod:`hf_sparse.evaluation`.

Sliding-window perplexity and KL to a reference model (:mod:`hf_sparse.evaluation.scoring`), the top-k reference
cache (:mod:`hf_sparse.evaluation.reference`), local lm-eval tasks (:mod:`hf_sparse.evaluation.lm_eval`) and
:func:`tokenize_texts` (:mod:`hf_sparse.text`).
"""

from __future__ import annotations

from .evaluation import ReferenceLogprobs, evaluate_lm, kl_to_reference, lm_eval_tasks, perplexity  # noqa: F401
from .evaluation import reference_logprobs, sliding_windows, tokenize_texts  # noqa: F401
from .evaluation.windows import DeviceLike  # noqa: F401

__all__ = ["ReferenceLogprobs", "evaluate_lm", "kl_to_reference", "lm_eval_tasks", "perplexity", "reference_logprobs",
           "sliding_windows", "tokenize_texts"]
