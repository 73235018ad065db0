"""Backward-compatible import path and ``python -m`` entry; the chat check lives in :mod:`hf_sparse.evaluation.chat`.

Regenerate the bundled teacher answers with::

    python -m hf_sparse.chat_eval generate-teacher-data
"""

from __future__ import annotations

import sys

from .evaluation import chat as _chat
from .evaluation.chat import *  # noqa: F401,F403
from .evaluation.chat import QUESTIONS_FILE, TEACHER_ANSWERS_FILE, TRAIN_PROMPTS_FILE, _trim_unfinished, normalize  # noqa: F401
from .evaluation.chat_cli import main

__all__ = list(_chat.__all__)

if __name__ == "__main__":
    sys.exit(main())
