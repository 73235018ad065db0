"""Quality checks for (sparse) causal LMs, one job per module.

- :mod:`~hf_sparse.evaluation.windows`: sliding-window forward passes (the engine of the checks below)
- :mod:`~hf_sparse.evaluation.scoring`: perplexity, and perplexity + KL to a reference in one pass (:func:`evaluate_lm`)
- :mod:`~hf_sparse.evaluation.kl`: the KL(p_ref || p_model) term (exact or top-k)
- :mod:`~hf_sparse.evaluation.reference`: the reference's distributions computed once, top-k cached, saved/loaded
- :mod:`~hf_sparse.evaluation.lm_eval`: local lm-eval task files, offline (the ``eval`` extra)
- :mod:`~hf_sparse.evaluation.chat`: the chat check for instruct models and teacher chat data
  (``python -m hf_sparse.chat_eval generate-teacher-data``)
- :mod:`~hf_sparse.evaluation.cli`: the ``hf-sparse eval`` verb; :mod:`~hf_sparse.evaluation.chat_cli`: ``python -m hf_sparse.chat_eval``

Text loading and tokenizing (:func:`tokenize_texts`, ``load_text``) are in :mod:`hf_sparse.text`, shared with
training. ``hf_sparse.evaluate`` and ``hf_sparse.chat_eval`` re-export these names for older imports.
"""

from ..text import tokenize_texts
from . import chat
from .chat import *  # noqa: F401,F403  (the chat check: its __all__)
from .lm_eval import lm_eval_tasks
from .reference import ReferenceLogprobs, reference_logprobs
from .scoring import evaluate_lm, kl_to_reference, perplexity
from .windows import sliding_windows

__all__ = [
    "ReferenceLogprobs",
    "evaluate_lm",
    "kl_to_reference",
    "lm_eval_tasks",
    "perplexity",
    "reference_logprobs",
    "sliding_windows",
    "tokenize_texts",
    *chat.__all__,
]
