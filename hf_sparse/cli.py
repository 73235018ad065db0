"""``hf-sparse`` command line: thin verbs that parse arguments and call the library.

Each verb lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``,
imported only when used, so one verb's optional dependencies never break another.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

VERBS: dict[str, tuple[str, str]] = {
    "demo": ("hf_sparse.demo", "the main job: dense -> one-shot 2:4 -> AST on the offline default model"),
    "train": ("hf_sparse.training.cli", "run an AST recipe (YAML) with ASTTrainer"),
    "prune": ("hf_sparse.oneshot.cli", "one-shot N:M pruning (magnitude, wanda, sparsegpt)"),
    "export": ("hf_sparse.exporters.cli", "export to 2:4 (+ quantized) safetensors"),
    "eval": ("hf_sparse.evaluation.cli", "perplexity / KL to dense on a text file or dataset"),
}


def _load(verb: str):
    module_name = VERBS[verb][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            return None
        raise


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="hf-sparse", description="2:4 sparsity for HF causal LMs (AST)")
    sub = parser.add_subparsers(dest="verb", required=True)
    chosen = argv[0] if argv and argv[0] in VERBS else None
    for verb, (_, help_text) in VERBS.items():
        verb_parser = sub.add_parser(verb, help=help_text)
        if verb == chosen:
            module = _load(verb)
            if module is None:
                parser.error(f"`hf-sparse {verb}` is not available in this version")
            module.add_arguments(verb_parser)
    args = parser.parse_args(argv)
    return int(_load(args.verb).run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
