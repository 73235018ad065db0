"""``hf-sparse eval --model PATH --text-file F [--reference PATH]``: perplexity (and KL to a reference) on a text.

Prints sliding-window perplexity, and with ``--reference`` (usually the dense model) the mean per-token
KL(p_ref || p_model); ``--chat`` adds the chat check (:mod:`hf_sparse.evaluation.chat`); ``--json`` writes it all.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

__all__ = ["add_arguments", "run"]

_DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory or hub id (hf_sparse exports load too)")
    parser.add_argument("--text-file", required=True,
                        help="text file, folder of .txt/.md files, or a `datasets` name (with --dataset-config)")
    parser.add_argument("--dataset-config", default=None, help="config name when --text-file is a dataset")
    parser.add_argument("--split", default="test", help="dataset split when --text-file is a dataset")
    parser.add_argument("--reference", default=None, help="reference (dense) model for KL(p_ref || p_model)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's)")
    parser.add_argument("--max-length", type=int, default=512, help="window length in tokens")
    parser.add_argument("--stride", type=int, default=256, help="window step; max-length - stride = context")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=_DTYPES, help="dtype the models are loaded in")
    parser.add_argument("--chat", action="store_true", help="also run the chat check (instruct models)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _load(path: str, tokenizer_path: str | None, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_sparse  # noqa: F401  (registers the hf_sparse export format with from_pretrained)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path)
    return model, tokenizer


def run(args: argparse.Namespace) -> int:
    import torch

    from ..text import load_text, tokenize_texts
    from .scoring import evaluate_lm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()
    model, tokenizer = _load(args.model, args.tokenizer, args.dtype, device)
    text = load_text(args.text_file, config=args.dataset_config, split=args.split)
    ids = tokenize_texts(tokenizer, [text])
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    reference = None
    if args.reference:
        reference, _ = _load(args.reference, args.tokenizer, args.dtype, device)
    result: dict[str, Any] = {"model": args.model, "text": args.text_file, "reference": args.reference,
                              "max_length": args.max_length, "stride": args.stride}
    result.update(evaluate_lm(model, ids, reference=reference, max_length=args.max_length, stride=args.stride,
                              batch_size=args.batch_size, device=device, progress=not args.no_progress))
    line = f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens"
    if "kl" in result:
        line += f"; KL(reference || model) {result['kl']:.4f} nats/token"
    print(line)
    if args.chat:
        from .chat import chat_accuracy

        chat = chat_accuracy(model, tokenizer, progress=not args.no_progress)
        result["chat_accuracy"], result["chat_answered"] = chat["accuracy"], chat["answered"]
        result["chat"] = chat["per_question"]
        print(f"chat accuracy {chat['accuracy']:.3f} (answered {chat['answered']:.3f}) on {chat['n']} questions")
    result["wall_time_s"] = round(time.time() - start, 2)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, ensure_ascii=False)
    return 0
