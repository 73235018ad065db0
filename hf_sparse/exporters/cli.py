"""``hf-sparse export SOURCE OUT_DIR`` (or ``--model SOURCE --output-dir OUT_DIR``, as ``hf-sparse prune``): pack an AST adapter / merged checkpoint as N:M (+ int8/int4) safetensors."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

from ..format import dtype_names, parse_dtype

logger = logging.getLogger(__name__)

def _group_size(value: str) -> Optional[int]:
    """Input channels per scale; per output channel is ``channel``, ``-1`` (transformers' GPTQConfig) or ``0``."""
    if value in ("channel", "none", "None", "-1", "0"):
        return None
    try:
        return int(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--group-size must be an integer, or 'channel' / -1, got {value!r}") from err


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import EXPORT_FORMATS
    from ..quantization import QUANTIZATION_METHODS

    parser.add_argument("source", nargs="?", help="AST adapter directory, or a merged N:M checkpoint directory "
                                                  "(or --model)")
    parser.add_argument("out_dir", nargs="?", help="export directory (or --output-dir)")
    parser.add_argument("--model", dest="model_opt", help="same as SOURCE (the flag `hf-sparse prune` takes)")
    parser.add_argument("--output-dir", dest="out_opt",
                        help="same as OUT_DIR: written atomically; an existing one is replaced only if it is empty or "
                             "a previous hf_sparse export, see --overwrite")
    parser.add_argument("--bits", type=int, choices=(16, 8, 4), default=16, help="kept-value precision")
    parser.add_argument("--group-size", type=_group_size, default=128,
                        help="input channels per scale, or 'channel' / -1 for per output channel")
    parser.add_argument("--asymmetric", action="store_true", help="store zero-points (default: symmetric)")
    parser.add_argument("--method", choices=tuple(QUANTIZATION_METHODS), default="rtn", help="quantization method")
    parser.add_argument("--targets", nargs="*", default=None,
                        help="modules to export: names/suffixes (default: every N:M linear of the model)")
    parser.add_argument("--calibration-file", type=Path, help="text file for GPTQ calibration")
    parser.add_argument("--num-samples", "--calibration-samples", dest="num_samples", type=int, default=64,
                        help="calibration sequences")
    parser.add_argument("--seq-len", "--calibration-seqlen", dest="seq_len", type=int, default=512,
                        help="tokens per calibration sequence")
    parser.add_argument("--format", dest="fmt", choices=tuple(EXPORT_FORMATS), default="hf_sparse",
                        help="hf_sparse (packed N:M, loads after `import hf_sparse`) or compressed-tensors (zeros "
                             "stored; the group size must divide every in_features)")
    parser.add_argument("--dtype", choices=dtype_names(), default="auto",
                        help="dtype of the dense rest (embeddings, norms, lm_head): 'auto' keeps the model's (fp32 for "
                             "an fp32 model), float16 halves it")
    parser.add_argument("--n", type=int, default=2, help="kept weights per group")
    parser.add_argument("--m", type=int, default=4, help="group size along the input dimension")
    parser.add_argument("--base-model", help="base model id for the model card (default: what the source recorded: "
                                             "`hf-sparse train`/`prune`/an earlier export)")
    parser.add_argument("--token-budget",
                        help="training tokens, for the model card (default: what the source recorded)")
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

    from ..calibration import consecutive_windows

    from .provenance import tokenizer_source

    tok = AutoTokenizer.from_pretrained(tokenizer_source(source) or str(source))
    try:
        return consecutive_windows(tok, args.calibration_file.read_text(encoding="utf-8"), args.num_samples, args.seq_len)
    except ValueError as err:
        raise SystemExit(f"hf-sparse export: {args.calibration_file}: {err}") from None


def _path_argument(positional: Optional[str], flag: Optional[str], name: str, flag_name: str) -> str:
    if positional and flag and positional != flag:
        raise SystemExit(f"hf-sparse export: {name} given twice ({positional!r} and {flag_name} {flag!r})")
    value = positional or flag
    if not value:
        raise SystemExit(f"hf-sparse export: {name} is required (positional, or {flag_name})")
    return value


def run(args: argparse.Namespace) -> int:
    from ..atomic import OutputDirectoryError, check_output_directory
    from ..quantization.config import HfSparseConfig
    from . import EXPORT_FORMATS
    from .api import load_for_export
    from .provenance import source_defaults

    source = Path(_path_argument(args.source, args.model_opt, "SOURCE", "--model"))
    out_dir = _path_argument(args.out_dir, args.out_opt, "OUT_DIR", "--output-dir")
    if not source.is_dir():
        raise SystemExit(f"hf-sparse export: SOURCE {str(source)!r} is not a directory")
    try:  # refuse before loading anything
        check_output_directory(Path(out_dir).resolve(), args.overwrite, [source], argument="OUT_DIR")
        config = HfSparseConfig(n=args.n, m=args.m, bits=args.bits, group_size=args.group_size,
                                symmetric=not args.asymmetric, method=args.method, targets=args.targets)
    except (OutputDirectoryError, ValueError) as err:
        raise SystemExit(f"hf-sparse export: {err}") from None
    # what the source recorded (base model, method, recipe, evaluation) and its tokenizer + chat template come along
    tokenizer, card = source_defaults(source, None, {"base_model": args.base_model, "token_budget": args.token_budget})
    model = load_for_export(source)
    write = EXPORT_FORMATS.get_entry(args.fmt)
    out = write(model, out_dir, config, calibration_data=_calibration(args, source), dtype=parse_dtype(args.dtype),
                card=card, overwrite=args.overwrite, tokenizer=tokenizer)
    print(f"exported to {out}")
    if args.push_to_hub:
        from ..integrations.hub import push_export_to_hub

        push_export_to_hub(out, args.push_to_hub, private=args.private or None)
        print(f"uploaded to https://huggingface.co/{args.push_to_hub}")
    return 0
