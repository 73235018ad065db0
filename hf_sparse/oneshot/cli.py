"""``hf-sparse prune``: one-shot N:M pruning of a model, saved as a plain loadable transformers model."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..format import dtype_names, parse_dtype

__all__ = ["add_arguments", "run", "load_model_and_tokenizer"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .registry import PRUNERS

    parser.add_argument("--method", required=True, choices=sorted(PRUNERS), help="one-shot pruning method")
    parser.add_argument(
        "--model", default=None, help="hub id, local directory, or .gguf file (default: the bundled model)"
    )
    parser.add_argument("--output-dir", required=True, help="where the pruned model is saved (written atomically; an "
                        "existing directory is replaced only if empty or a previous hf_sparse output, see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output-dir even if it holds other files (never the model or the current directory)")
    parser.add_argument(
        "--calibration-file", default=None, help="UTF-8 text file (default: the bundled Shakespeare train split)"
    )
    parser.add_argument(
        "--calibration-ids-file", default=None, help="token ids instead of text: .safetensors (tensor input_ids) or .json"
    )
    parser.add_argument("--num-samples", type=int, default=32, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    parser.add_argument("--n", type=int, default=2, help="kept weights per group")
    parser.add_argument("--m", type=int, default=4, help="group size along the input dimension")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    parser.add_argument("--dtype", default="float32", choices=dtype_names(allow_auto=False), help="load dtype")
    parser.add_argument("--device", default=None, help="where layers run (default: cuda if available, else cpu)")
    parser.add_argument("--targets", nargs="*", default=None,
                        help="modules to prune: names/suffixes as in PEFT (default: every Linear in the decoder blocks)")
    parser.add_argument("--exclude", nargs="*", default=None, help="modules kept dense (default: MoE routers)")


def load_model_and_tokenizer(name_or_path: Optional[str], dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The project's loader when :mod:`hf_sparse.assets` provides one (``None``: the bundled model), else
    transformers (GGUF-aware)."""
    try:
        from ..assets import load_model_and_tokenizer as load  # type: ignore[attr-defined]
    except ImportError:
        load = None
    if load is not None:
        return load(name_or_path, dtype=dtype)
    if name_or_path is None:
        raise SystemExit("hf-sparse prune: argument --model is required (no bundled default model in this install)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    path = name_or_path
    if name_or_path.endswith(".gguf"):
        path, kwargs["gguf_file"] = os.path.dirname(os.path.abspath(name_or_path)), os.path.basename(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    return model, tokenizer


BUNDLED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what hf_sparse.assets converts (Apache-2.0)


def _base_model_name(model: Optional[str]) -> str:
    """The base model as a card should name it: a hub id as given, a local path made absolute, the bundled one's id."""
    if model is None:
        return BUNDLED_BASE_MODEL
    return os.path.abspath(model) if os.path.exists(model) else model


def _default_calibration_text() -> list[str]:
    try:
        from ..assets import shakespeare  # type: ignore[attr-defined]
    except ImportError:
        raise SystemExit(
            "hf-sparse prune: no calibration data: pass --calibration-file TXT or --calibration-ids-file "
            "(the bundled corpus needs hf_sparse.assets)"
        ) from None
    return shakespeare("train")


def _calibration(args: argparse.Namespace, tokenizer: Any) -> Optional[Any]:
    from ..calibration import calibration_ids_from_text, load_calibration_ids

    if args.method == "magnitude":
        return None
    if args.calibration_ids_file:
        return load_calibration_ids(args.calibration_ids_file)
    if args.calibration_file:
        with open(args.calibration_file, encoding="utf-8") as f:
            texts: list[str] = [f.read()]
    else:
        texts = _default_calibration_text()
    return calibration_ids_from_text(tokenizer, texts, args.num_samples, args.seq_len, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from ..atomic import OutputDirectoryError, atomic_directory, check_output_directory
    from ..sparsity.nm import input_dim_of, nm_violations
    from .api import prune_oneshot, select_targets
    from ..calibration import as_batches
    from ..exporters.provenance import save_tokenizer

    sources = [args.model] if args.model and os.path.exists(args.model) else []  # a local dir or .gguf: never replaced
    try:  # refuse before loading and pruning
        check_output_directory(Path(args.output_dir).resolve(), args.overwrite, sources, argument="--output-dir")
    except OutputDirectoryError as err:
        raise SystemExit(f"hf-sparse prune: {err}") from None

    dtype = parse_dtype(args.dtype, "--dtype", allow_auto=False)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
    model.eval()
    ids = _calibration(args, tokenizer)
    start = time.perf_counter()
    masks = prune_oneshot(model, args.method, ids, n=args.n, m=args.m, target_modules=args.targets,
                          exclude_modules=args.exclude, batch_size=args.batch_size, device=device)
    seconds = time.perf_counter() - start
    targets = select_targets(model, args.targets, args.exclude, n=args.n, m=args.m)
    bad = [name for name, mod in targets.items() if nm_violations(mod.weight, args.n, args.m, dim=input_dim_of(mod))]
    if bad:
        raise RuntimeError(f"hf-sparse prune: weights not {args.n}:{args.m} after pruning: {bad[:5]}")
    report = {
        "method": args.method,
        "model": args.model,
        "base_model": _base_model_name(args.model),  # what the export's model card names (and links, for a hub id)
        "n": args.n,
        "m": args.m,
        "num_targets": len(masks),
        "calibration_sequences": 0 if ids is None else sum(int(b.shape[0]) for b in as_batches(ids, 1 << 30)),
        "seconds": round(seconds, 2),
    }
    with atomic_directory(args.output_dir, overwrite=args.overwrite, sources=sources, writer="hf_sparse.prune",
                          argument="--output-dir") as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)  # the one helper exports use too (chat template included)
        with open(os.path.join(tmp, "hf_sparse_oneshot.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    print(f"{args.method} {args.n}:{args.m}: pruned {len(masks)} modules in {seconds:.1f}s -> {args.output_dir}")
    return 0

