"""``python -m hf_sparse.chat_eval``: run the chat check on a model, or regenerate the bundled teacher answers."""

from __future__ import annotations

import argparse
import json
import time
from typing import Optional

from .chat import (
    TEACHER_ANSWERS_FILE,
    _data_path,
    chat_accuracy,
    generate_chat_answers,
    load_train_prompts,
)
from .chat import __doc__ as _CHAT_DOC

__all__ = ["main"]


def _load(model_path: Optional[str]):
    from .. import assets

    return assets.load_model_and_tokenizer(str(model_path or assets.default_model_dir()))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_sparse.chat_eval", description=(_CHAT_DOC or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate-teacher-data", help="regenerate data/chat_teacher_answers.json with the dense model")
    gen.add_argument("--model", default=None, help="model dir or hub id (default: the bundled SmolLM2 model)")
    gen.add_argument("--output", default=None, help=f"JSON file (default: the package's data/{TEACHER_ANSWERS_FILE})")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--batch-size", type=int, default=16)
    acc = sub.add_parser("accuracy", help="run the chat check on a model and print the answers")
    acc.add_argument("--model", default=None, help="model dir or hub id (default: the bundled SmolLM2 model)")
    acc.add_argument("--max-new-tokens", type=int, default=24)
    acc.add_argument("--batch-size", type=int, default=8)
    acc.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    model, tokenizer = _load(args.model)
    start = time.time()
    if args.command == "accuracy":
        result = chat_accuracy(model, tokenizer, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                               progress=True)
        for p in result["per_question"]:
            print(f"{'ok ' if p['correct'] else '-- '} {p['question']} -> {p['answer']!r}")
        print(f"accuracy {result['accuracy']:.3f}, answered {result['answered']:.3f} ({time.time() - start:.1f} s)")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=1, ensure_ascii=False)
        return 0
    prompts = load_train_prompts()
    answers = generate_chat_answers(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, progress=True)
    doc = {
        "generated_by": "python -m hf_sparse.chat_eval generate-teacher-data",
        "model": str(args.model or "SmolLM2-135M-Instruct (hf_sparse.assets.default_model_dir())"),
        "max_new_tokens": args.max_new_tokens,
        "decoding": "greedy, default chat template (no system prompt given)",
        "items": [{"prompt": p, **a} for p, a in zip(prompts, answers)],
    }
    output = args.output or str(_data_path(TEACHER_ANSWERS_FILE))
    with open(output, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    done = sum(a["finished"] for a in answers)
    print(f"{len(answers)} answers ({done} finished before max_new_tokens) in {time.time() - start:.1f} s -> {output}")
    return 0
