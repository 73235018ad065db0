"""hf_sparse.evaluation.chat: question data, answer matching, batched greedy chat answers, teacher conversations."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tiny_chat_tokenizer import tiny_chat_model, tiny_chat_tokenizer

from hf_sparse.evaluation.chat import (
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

ROOT = Path(__file__).resolve().parents[1]
STOP = {"what", "is", "the", "a", "an", "of", "in", "on", "do", "does", "how", "many", "which", "are", "to", "you",
        "and", "it", "when", "at", "for", "me", "i", "can", "your", "our", "from", "who", "make", "with", "be"}


def _fixed_output_model(tokenizer, token: str, seed: int = 0):
    """A tiny Llama whose head always prefers ``token`` (a real Linear with a bias: greedy emits it every step)."""
    model = tiny_chat_model(tokenizer, seed=seed)
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.convert_tokens_to_ids(token)] = 10.0
    model.lm_head = head
    return model


def test_bundled_questions_load_and_are_valid():
    questions = load_questions()
    assert len(questions) == 40
    assert len({q["id"] for q in questions}) == 40
    for q in questions:
        assert q["question"].endswith("?") and q["answers"]
        assert not answer_matches(q["question"], q["answers"])


@pytest.mark.parametrize("bad,message", [
    ([{"question": "What is 1 + 1?", "answers": []}], "non-empty list"),
    ([{"question": "Q one?", "answers": ["a"]}, {"question": "q  ONE?", "answers": ["b"]}], "duplicate"),
    ([{"question": "Is Paris the capital of France?", "answers": ["Paris"]}], "contains one of its own answers"),
    ([{"answers": ["x"]}], "`question`"),
])
def test_question_file_validation_errors(tmp_path, bad, message):
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"questions": bad}))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_questions(str(path))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", normalize(text))) - STOP


def test_train_prompts_do_not_overlap_the_eval_questions():
    prompts = load_train_prompts()
    questions = load_questions()
    assert 150 <= len(prompts) <= 300
    assert len({normalize(p) for p in prompts}) == len(prompts)
    eval_keys = {normalize(q["question"]) for q in questions}
    for p in prompts:
        assert normalize(p) not in eval_keys
        for q in questions:
            a, b = _words(p), _words(q["question"])
            assert len(a & b) / max(1, len(a | b)) < 0.5, (p, q["question"])
            if not any(ans.isdigit() for ans in q["answers"]):  # numbers are fine in other contexts
                assert not answer_matches(p, q["answers"]), (p, q["answers"])


@pytest.mark.parametrize("answer,accepted,expected", [
    ("Paris.", ["Paris"], True),
    ("The capital of France is PARIS, of course", ["Paris"], True),
    ("Parisian food is great", ["Paris"], False),
    ("2 + 2 = 4.", ["4", "four"], True),
    ("It is four.", ["4", "four"], True),
    ("It is 14.", ["4"], False),
    ("About 40", ["4"], False),
    ("4.5 probably", ["4"], False),
    ("1,400 of them", ["400"], False),
    ("Cats say meow", ["cat"], True),
    ("The category is", ["cat"], False),
    ("Water is H₂O", ["H2O"], True),
    ("They take in carbon\n dioxide", ["carbon dioxide"], True),
    ("", ["Paris"], False),
])
def test_answer_matching_rules(answer, accepted, expected):
    assert answer_matches(answer, accepted) is expected


def test_trim_unfinished_keeps_whole_sentences():
    assert _trim_unfinished("One thing. Two things! Thr") == "One thing. Two things!"
    assert _trim_unfinished("no sentence end here") == "no sentence end here"
    assert _trim_unfinished("Kinds:\n1. Rain is wet.\n2. Snow is cold.\n3. Fo") == "Kinds:\n1. Rain is wet.\n2. Snow is cold."
    assert _trim_unfinished("1. Baseball\n2. Softball\n3. Bas") == "1. Baseball\n2. Softball"


def test_chat_accuracy_runs_with_a_tiny_model_and_local_chat_template():
    tok = tiny_chat_tokenizer()
    model = tiny_chat_model(tok)
    result = chat_accuracy(model, tok, max_new_tokens=6, batch_size=16)
    assert result["n"] == 40 and len(result["per_question"]) == 40
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["answered"] <= 1.0
    assert {"id", "question", "answer", "correct"} <= set(result["per_question"][0])


def test_batched_left_padded_answers_equal_one_by_one():
    tok = tiny_chat_tokenizer()
    model = tiny_chat_model(tok, seed=3)
    prompts = ["Hi", "What is the capital of France?", "Name a color, please, any color at all.", "2+2?"]
    batched = generate_chat_answers(model, tok, prompts, max_new_tokens=8, batch_size=4)
    single = [generate_chat_answers(model, tok, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_a_model_that_ends_its_turn_at_once_answers_nothing():
    tok = tiny_chat_tokenizer()
    model = _fixed_output_model(tok, "<|im_end|>")
    result = chat_accuracy(model, tok, max_new_tokens=8)
    assert result["answered"] == 0.0 and result["accuracy"] == 0.0
    assert all(p["answer"] == "" for p in result["per_question"])
    assert teacher_chat_texts(model, tok, ["Say hi"], max_new_tokens=8, progress=False) == []


def test_a_correct_answer_is_counted():
    tok = tiny_chat_tokenizer()
    model = _fixed_output_model(tok, "x")
    questions = [{"id": 1, "question": "Say five x.", "answers": ["xxxxx"]},
                 {"id": 2, "question": "Say y.", "answers": ["y"]}]
    result = chat_accuracy(model, tok, questions=questions, max_new_tokens=5)
    assert [p["answer"] for p in result["per_question"]] == ["xxxxx", "xxxxx"]
    assert result["accuracy"] == 0.5 and result["answered"] == 1.0


def test_teacher_chat_texts_are_full_conversations():
    tok = tiny_chat_tokenizer()
    model = _fixed_output_model(tok, "x")
    texts = teacher_chat_texts(model, tok, ["Say hi", "Write a poem"], max_new_tokens=6, batch_size=2, progress=False)
    assert texts == [
        tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": "xxxxxx"}],
                                tokenize=False)
        for p in ["Say hi", "Write a poem"]
    ]
    assert texts[0] == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nxxxxxx<|im_end|>\n"


def test_chat_needs_a_chat_template():
    tok = tiny_chat_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        generate_chat_answers(tiny_chat_model(tiny_chat_tokenizer()), tok, ["hi"], max_new_tokens=2)


def test_precomputed_teacher_answers_format_with_any_chat_tokenizer():
    doc = load_teacher_answers()
    prompts = load_train_prompts()
    assert [item["prompt"] for item in doc["items"]] == prompts
    assert "generate-teacher-data" in doc["generated_by"]
    conversations = teacher_chat_conversations(tiny_chat_tokenizer())
    assert len(conversations) == sum(bool(item["answer"].strip()) for item in doc["items"]) >= 0.9 * len(prompts)
    assert all(c.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in c for c in conversations)


def test_data_files_ship_as_package_data():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert "data/*.json" in section
    for name in ["chat_questions.json", "chat_train_prompts.json", "chat_teacher_answers.json"]:
        assert (ROOT / "hf_sparse" / "data" / name).is_file()
