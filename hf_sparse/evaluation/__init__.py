"""Quality checks for (sparse) causal LMs, one job per module.

- :mod:`~hf_sparse.evaluation.windows`: sliding-window forward passes (the engine of the checks below)
- :mod:`~hf_sparse.evaluation.scoring`: perplexity, and perplexity + KL to a reference in one pass (:func:`evaluate_lm`)
- :mod:`~hf_sparse.evaluation.kl`: KL(p_ref || p_model) to a reference (dense) model or cache
- :mod:`~hf_sparse.evaluation.reference`: the reference's distributions computed once, top-k cached, saved/loaded
- :mod:`~hf_sparse.evaluation.lm_eval`: local lm-eval task files, offline (the ``eval`` extra)
- :mod:`~hf_sparse.evaluation.chat`: the chat check for instruct models and teacher chat data
  (``python -m hf_sparse.chat_eval generate-teacher-data``)
- :mod:`~hf_sparse.evaluation.cli`: the ``hf-sparse eval`` verb

Text loading and tokenizing (:func:`tokenize_texts`, ``load_text``) are in :mod:`hf_sparse.text`, shared with
training. ``hf_sparse.evaluate`` and ``hf_sparse.chat_eval`` re-export these names for older imports.
"""

from ..text import tokenize_texts
from .chat import (
    answer_matches,
    chat_accuracy,
    generate_chat_answers,
    load_questions,
    load_teacher_answers,
    load_train_prompts,
    teacher_chat_conversations,
    teacher_chat_texts,
)
from .lm_eval import lm_eval_tasks
from .reference import ReferenceLogprobs, reference_logprobs
from .scoring import evaluate_lm, kl_to_reference, perplexity
from .windows import sliding_windows

__all__ = [
    "ReferenceLogprobs",
    "answer_matches",
    "chat_accuracy",
    "evaluate_lm",
    "generate_chat_answers",
    "kl_to_reference",
    "lm_eval_tasks",
    "load_questions",
    "load_teacher_answers",
    "load_train_prompts",
    "perplexity",
    "reference_logprobs",
    "sliding_windows",
    "teacher_chat_conversations",
    "teacher_chat_texts",
    "tokenize_texts",
]
