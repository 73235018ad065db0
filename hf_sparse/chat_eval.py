"""Backward-compatible import path and ``python -m`` entry; the chat check lives in :mod:`hf_sparse.evaluation.chat`.

Regenerate the bundled teacher answers with::

    python -m hf_sparse.chat_eval generate-teacher-data
"""

from __future__ import annotations

import sys

from .evaluation.chat_cli import main
from .evaluation.chat import (
    QUESTIONS_FILE,
    TEACHER_ANSWERS_FILE,
    TRAIN_PROMPTS_FILE,
    _trim_unfinished,
    answer_matches,
    chat_accuracy,
    generate_chat_answers,
    load_questions,
    load_teacher_answers,
    load_train_prompts,
    normalize,
    teacher_chat_conversations,
    teacher_chat_texts,
)

__all__ = [
    "answer_matches",
    "chat_accuracy",
    "generate_chat_answers",
    "load_questions",
    "load_teacher_answers",
    "load_train_prompts",
    "teacher_chat_conversations",
    "teacher_chat_texts",
]

if __name__ == "__main__":
    sys.exit(main())
