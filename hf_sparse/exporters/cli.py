"""``hf-sparse export SOURCE OUT_DIR``: pack an AST adapter / merged checkpoint as N:M (+ int8/int4) safetensors."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _group_size(value: str) -> Optional[int]:
    if value in ("channel", "none", "None"):
        return None
    try:
        return int(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--group-size must be an integer or 'channel', got {value!r}") from err


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="AST adapter directory, or a merged N:M checkpoint directory")
    parser.add_argument("out_dir", help="export directory (written atomically; an existing one is replaced only if it "
                                         "is empty or a previous hf_sparse export, see --overwrite)")
    parser.add_argument("--bits", type=int, choices=(16, 8, 4), default=16, help="kept-value precision")
    parser.add_argument("--group-size", type=_group_size, default=128, help="input channels per scale, or 'channel'")
    parser.add_argument("--asymmetric", action="store_true", help="store zero-points (default: symmetric)")
    parser.add_argument("--method", choices=("rtn", "gptq"), default="rtn", help="quantization method")
    parser.add_argument("--calibration-file", type=Path, help="text file for GPTQ calibration")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--calibration-seqlen", type=int, default=512)
    parser.add_argument("--format", dest="fmt", choices=("hf_sparse", "compressed-tensors"), default="hf_sparse")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="auto", help="dtype of the dense rest")
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--base-model", help="base model id for the model card")
    parser.add_argument("--token-budget", help="training tokens, for the model card")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the export to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR even if it holds other files (never the source or the current directory)")


def _calibration(args: argparse.Namespace, source: Path):
    if args.method != "gptq" or args.bits == 16:
        return None
    if args.calibration_file is None:
        raise SystemExit("hf-sparse export: --method gptq needs --calibration-file (a text file)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source))
    ids = tok(args.calibration_file.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    seq = args.calibration_seqlen
    chunks = [ids[i : i + seq] for i in range(0, ids.numel() - seq + 1, seq)][: args.calibration_samples]
    if not chunks:
        raise SystemExit(f"hf-sparse export: {args.calibration_file} has fewer than {seq} tokens")
    return torch.stack(chunks)


def run(args: argparse.Namespace) -> int:
    from ..atomic import OutputDirectoryError, check_output_directory
    from .api import load_for_export, export

    source = Path(args.source)
    if not source.is_dir():
        raise SystemExit(f"hf-sparse export: SOURCE {str(source)!r} is not a directory")
    try:  # refuse before loading anything
        check_output_directory(Path(args.out_dir).resolve(), args.overwrite, [source], argument="OUT_DIR")
    except OutputDirectoryError as err:
        raise SystemExit(f"hf-sparse export: {err}") from None
    model = load_for_export(source)
    card = {"base_model": args.base_model, "token_budget": args.token_budget}
    kwargs = dict(
        bits=args.bits, group_size=args.group_size, symmetric=not args.asymmetric, method=args.method,
        calibration_data=_calibration(args, source), n=args.n, m=args.m, dtype=_DTYPES[args.dtype], card=card,
        overwrite=args.overwrite,
    )
    if args.fmt == "compressed-tensors":
        from ..integrations.compressed_tensors import export_compressed_tensors

        out = export_compressed_tensors(model, args.out_dir, **kwargs)
    else:
        out = export(model, args.out_dir, **kwargs)
    print(f"exported to {out}")
    if args.push_to_hub:
        from ..integrations.hub import push_export_to_hub

        push_export_to_hub(out, args.push_to_hub, private=args.private or None)
        print(f"uploaded to https://huggingface.co/{args.push_to_hub}")
    return 0
