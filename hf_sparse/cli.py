"""``hf-sparse`` command line: thin verbs that parse arguments and call the library.

Each verb lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``,
imported only when used, so one verb's optional dependencies never break another. Every ``--help`` shows the
defaults; ``hf-sparse --version``; an error is one line on stderr (exit 1), ``--debug`` (before or after the verb)
re-raises it with its traceback.
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


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, minus the noise: no "(default: None/False)", and nothing added to a help text
    that already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == [] or default == argparse.SUPPRESS \
                or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hf-sparse")
    except Exception:  # noqa: BLE001 - a source checkout without installed metadata
        from . import __version__

        return __version__


def _debug_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error (default: one line)")
    return parent


def _error_line(err: BaseException) -> str:
    """One line for the user: the exception's message (its first line), typed unless it is a plain usage error."""
    text = str(err).strip() or type(err).__name__
    first = text.splitlines()[0]
    if len(text.splitlines()) > 1:
        first += " ..."
    return first if isinstance(err, (ValueError, FileNotFoundError)) and type(err).__module__ == "builtins" \
        else f"{type(err).__name__}: {first}"


def main(argv: Optional[list[str]] = None) -> int:
    """Run a verb. Errors print one line (``hf-sparse VERB: error: ...``, exit 1); ``--debug`` re-raises them."""
    argv = sys.argv[1:] if argv is None else list(argv)
    formatter = DefaultsHelpFormatter  # every --help shows the defaults
    parser = argparse.ArgumentParser(prog="hf-sparse", description="2:4 sparsity for HF causal LMs (AST)",
                                     formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"hf-sparse {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (default: one line)")
    sub = parser.add_subparsers(dest="verb", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    chosen = chosen if chosen in VERBS else None
    for verb, (_, help_text) in VERBS.items():
        verb_parser = sub.add_parser(verb, help=help_text, description=help_text, formatter_class=formatter,
                                     parents=[_debug_parent()])
        if verb == chosen:
            module = _load(verb)
            if module is None:
                parser.error(f"`hf-sparse {verb}` is not available in this version")
            module.add_arguments(verb_parser)
    args = parser.parse_args(argv)
    try:
        return int(_load(args.verb).run(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"hf-sparse {args.verb}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise  # argparse and the verbs' own one-line messages
    except Exception as err:  # noqa: BLE001 - the CLI's one place that turns errors into one line
        if args.debug:
            raise
        print(f"hf-sparse {args.verb}: error: {_error_line(err)} (--debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
