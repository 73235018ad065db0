"""A small chat check for instruct models, and teacher-generated chat data for distillation.

Why: perplexity hides what users of an *instruct* model lose. One-shot 2:4 SmolLM2-135M-Instruct keeps a
tolerable perplexity but answers nothing (it emits end-of-turn at once). :func:`chat_accuracy` asks 40 simple
factual questions (``data/chat_questions.json``) through the tokenizer's chat template, decodes greedily and
counts an answer correct when it contains an accepted answer as a whole word (:func:`answer_matches`).

Distillation on raw text alone does not bring the chat behaviour back, so :func:`teacher_chat_texts` has the
dense teacher answer a separate set of training prompts (``data/chat_train_prompts.json``, no overlap with the
eval questions) and returns full chat-formatted conversations to mix into the training data. For the bundled
model those answers are precomputed (``data/chat_teacher_answers.json``) by::

    python -m hf_sparse.chat_eval generate-teacher-data

and loaded with :func:`teacher_chat_conversations`.
"""

from __future__ import annotations

import json
import re
import unicodedata
from importlib import resources
from typing import Any, Optional, Sequence

import torch

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

QUESTIONS_FILE = "chat_questions.json"
TRAIN_PROMPTS_FILE = "chat_train_prompts.json"
TEACHER_ANSWERS_FILE = "chat_teacher_answers.json"


def _data_path(name: str):
    return resources.files("hf_sparse").joinpath("data", name)


def _read_json(path: Optional[str], default_name: str) -> Any:
    if path is None:
        return json.loads(_data_path(default_name).read_text(encoding="utf-8"))
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def normalize(text: str) -> str:
    """Lower case, NFKC (so 'H₂O' reads 'h2o'), whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def _answer_pattern(accepted: str) -> re.Pattern:
    body = re.escape(normalize(accepted))
    if re.fullmatch(r"[\d.,]+", accepted):  # numbers: not part of a longer number (4 is not in 14, 40 or 4.5)
        return re.compile(rf"(?<![\w.,]){body}(?![\w]|[.,]\d)")
    return re.compile(rf"(?<!\w){body}(?:s|es)?(?!\w)")


def answer_matches(answer: str, accepted: Sequence[str]) -> bool:
    """True when ``answer`` contains one of ``accepted`` as a whole word/phrase (case-insensitive, plural ok)."""
    text = normalize(answer)
    return any(_answer_pattern(a).search(text) for a in accepted)


def load_questions(path: Optional[str] = None) -> list[dict[str, Any]]:
    """The chat check's questions (``[{"id", "question", "answers"}]``), validated.

    Every question needs a non-empty ``answers`` list, questions are unique, and no accepted answer may occur
    in its own question (an answer that merely echoes the question must not count).
    """
    doc = _read_json(path, QUESTIONS_FILE)
    items = doc["questions"] if isinstance(doc, dict) else doc
    where = path or f"hf_sparse/data/{QUESTIONS_FILE}"
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where}: expected a non-empty list of questions")
    seen: set[str] = set()
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) or not item["question"].strip():
            raise ValueError(f"{where}: item {i} needs a non-empty string `question`")
        answers = item.get("answers")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise ValueError(f"{where}: question {item['question']!r} needs a non-empty list of string `answers`")
        key = normalize(item["question"])
        if key in seen:
            raise ValueError(f"{where}: duplicate question {item['question']!r}")
        seen.add(key)
        if answer_matches(item["question"], answers):
            raise ValueError(f"{where}: question {item['question']!r} contains one of its own answers {answers}")
        out.append({"id": item.get("id", i + 1), "question": item["question"], "answers": list(answers)})
    return out


def load_train_prompts(path: Optional[str] = None) -> list[str]:
    """Prompts for teacher-generated chat distillation data (disjoint from the chat check's questions)."""
    doc = _read_json(path, TRAIN_PROMPTS_FILE)
    prompts = doc["prompts"] if isinstance(doc, dict) else doc
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"{path or TRAIN_PROMPTS_FILE}: expected a list of non-empty prompt strings")
    return prompts


def _chat_prompt(tokenizer: Any, user: str, system_prompt: Optional[str]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("argument `tokenizer` has no chat_template; the chat check needs an instruct tokenizer")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _stop_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation_config defines an eos token")
    return sorted(ids)


@torch.no_grad()
def generate_chat_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 24,
    batch_size: int = 8,
    system_prompt: Optional[str] = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Greedy chat answers, batched with left padding; ``[{"answer": str, "finished": bool}]`` in prompt order.

    ``finished`` is False when the answer hit ``max_new_tokens`` before an end-of-turn/eos token.
    Prompts are batched by length (less padding) and results returned in the original order.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"arguments `batch_size` and `max_new_tokens` must be >= 1, got {batch_size}, {max_new_tokens}")
    stops = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    encoded = [tokenizer(_chat_prompt(tokenizer, p, system_prompt), add_special_tokens=False)["input_ids"]
               for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad_id, eos_token_id=stops)
    results: list[Optional[dict[str, Any]]] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="chat", disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            for row, i in enumerate(idx):
                new = out[row, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in stops), None)
                text = tokenizer.decode(new if cut is None else new[:cut], skip_special_tokens=True)
                results[i] = {"answer": text.strip(), "finished": cut is not None}
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def chat_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Optional[list[dict[str, Any]]] = None,
    max_new_tokens: int = 24,
    batch_size: int = 8,
    system_prompt: Optional[str] = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Share of questions answered correctly (greedy), share answered at all, and every question's answer.

    Returns ``{"accuracy", "answered", "n", "per_question": [{"id", "question", "answer", "correct"}]}``.
    """
    questions = load_questions() if questions is None else questions
    answers = generate_chat_answers(model, tokenizer, [q["question"] for q in questions], max_new_tokens,
                                    batch_size, system_prompt, progress)
    per = [{"id": q.get("id", i + 1), "question": q["question"], "answer": a["answer"],
            "correct": answer_matches(a["answer"], q["answers"])} for i, (q, a) in enumerate(zip(questions, answers))]
    n = len(per)
    return {"accuracy": sum(p["correct"] for p in per) / n, "answered": sum(bool(p["answer"]) for p in per) / n,
            "n": n, "per_question": per}


def _trim_unfinished(answer: str) -> str:
    """Cut a truncated answer back to its last full sentence (so the conversation does not end mid-word)."""
    ends = [m.end() for m in re.finditer(r"(?<!\d)[.!?](?=\s|$)|\n", answer)]  # "4." starts a list item
    return answer[: ends[-1]].rstrip() if ends and ends[-1] >= len(answer) // 3 else answer


def _conversation(tokenizer: Any, prompt: str, answer: str, system_prompt: Optional[str]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("argument `tokenizer` has no chat_template; chat distillation data needs one")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def teacher_chat_texts(
    teacher: torch.nn.Module,
    tokenizer: Any,
    prompts: Optional[Sequence[str]] = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    system_prompt: Optional[str] = None,
    progress: bool = True,
) -> list[str]:
    """The dense teacher's greedy answers to ``prompts`` (default: the bundled training prompts) as full
    chat-formatted conversations, ready to tokenize for distillation. Empty answers are dropped; answers cut
    by ``max_new_tokens`` are trimmed to their last full sentence."""
    prompts = load_train_prompts() if prompts is None else list(prompts)
    answers = generate_chat_answers(teacher, tokenizer, prompts, max_new_tokens, batch_size, system_prompt, progress)
    return _conversations(tokenizer, [{"prompt": p, **a} for p, a in zip(prompts, answers)], system_prompt)


def _conversations(tokenizer: Any, items: list[dict[str, Any]], system_prompt: Optional[str]) -> list[str]:
    out = []
    for item in items:
        answer = item["answer"] if item.get("finished", True) else _trim_unfinished(item["answer"])
        if answer.strip():
            out.append(_conversation(tokenizer, item["prompt"], answer, system_prompt))
    return out


def load_teacher_answers(path: Optional[str] = None) -> dict[str, Any]:
    """The precomputed teacher answers (``{"model", "max_new_tokens", "items": [{"prompt","answer","finished"}]}``)."""
    doc = _read_json(path, TEACHER_ANSWERS_FILE)
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise ValueError(f"{path or TEACHER_ANSWERS_FILE}: expected an object with an `items` list")
    return doc


def teacher_chat_conversations(tokenizer: Any, path: Optional[str] = None,
                               system_prompt: Optional[str] = None) -> list[str]:
    """Chat-formatted teacher conversations from the precomputed answers (no generation; instant).

    The bundled answers come from dense SmolLM2-135M-Instruct (the default model); for another model generate
    its own with :func:`teacher_chat_texts` or ``python -m hf_sparse.chat_eval generate-teacher-data --model``.
    """
    return _conversations(tokenizer, load_teacher_answers(path)["items"], system_prompt)
