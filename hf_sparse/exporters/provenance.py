"""What an export carries over from its source: the tokenizer (and chat template), and the provenance its model
card states (base model, how it was sparsified, budget, recipe, evaluation, license).

Why one module: ``hf-sparse prune``, ``hf-sparse train``, ``hf-sparse export`` and ``optimum-cli export hf-sparse``
all write directories that a later step exports or re-exports; each records what it knows in
:data:`PROVENANCE_FILE` and copies the tokenizer with :func:`save_tokenizer`, so the final card and
``pipeline("text-generation", model=export_dir)`` work whatever path the model took.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

logger = logging.getLogger(__name__)

__all__ = [
    "PROVENANCE_FILE", "TOKENIZER_FILES", "adapter_base_model", "base_model_license", "is_hub_id", "read_provenance",
    "save_tokenizer", "tokenizer_source", "write_provenance",
]

PROVENANCE_FILE = "hf_sparse_provenance.json"
#: the files a tokenizer (and its chat template) is saved as, by transformers' tokenizers of every kind
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model",
)
#: licenses of base models whose local copy carries no model card: the offline default (hf_sparse.assets converts
#: SmolLM2-135M-Instruct, Apache-2.0, from a GGUF into a card-less directory)
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}
_ONESHOT_REPORT = "hf_sparse_oneshot.json"  # written by `hf-sparse prune`
_RECIPE_FILE = "ast_recipe.yaml"  # written by `hf-sparse train` (hf_sparse.training.recipe.RECIPE_FILE)


def is_hub_id(name: Optional[str]) -> bool:
    """``owner/name`` that is not a local path: the only base models a card may link to huggingface.co."""
    if not name:
        return False
    text = str(name)
    if text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") != 1 or os.path.exists(text):
        return False
    return all(part and " " not in part for part in text.split("/"))


def has_tokenizer_files(directory: Union[str, Path]) -> bool:
    d = Path(directory)
    return d.is_dir() and any((d / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json",
                                                                 "tokenizer.model", "vocab.json"))


def adapter_base_model(adapter_dir: Union[str, Path]) -> Optional[str]:
    """``base_model_name_or_path`` of a PEFT adapter directory (None when not recorded)."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path") or None


def tokenizer_source(source: Union[str, Path]) -> Optional[str]:
    """Where the tokenizer of an export source lives: the directory itself, else (an adapter) its base model."""
    source = Path(source)
    if has_tokenizer_files(source):
        return str(source)
    base = adapter_base_model(source)
    if base and (has_tokenizer_files(base) or is_hub_id(base)):
        return base
    return None


def save_tokenizer(tokenizer_or_source: Any, out_dir: Union[str, Path]) -> bool:
    """Write the tokenizer (and its chat template) into ``out_dir``; True when something was written.

    A tokenizer object is saved with ``save_pretrained``; a local directory has its tokenizer files copied byte for
    byte (the chat template included); a hub id is loaded with ``AutoTokenizer`` (the local cache when offline).
    A source without a tokenizer is not an error: the export is usable with ``--tokenizer``/``tokenizer=``.
    """
    out_dir = Path(out_dir)
    if tokenizer_or_source is None:
        return False
    if hasattr(tokenizer_or_source, "save_pretrained"):
        tokenizer_or_source.save_pretrained(str(out_dir))
        return True
    source = str(tokenizer_or_source)
    if os.path.isdir(source):
        copied = [n for n in TOKENIZER_FILES if (Path(source) / n).is_file()]
        for name in copied:
            shutil.copyfile(Path(source) / name, out_dir / name)
        return bool(copied)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(str(out_dir))
        return True
    except (OSError, ValueError) as err:
        logger.warning("no tokenizer saved with the export: %s has none (%s)", source, err)
        return False


def base_model_license(base_model: Optional[str]) -> Optional[str]:
    """The base model's license from its model card (``license:`` front matter) or config, when available offline."""
    if not base_model:
        return None
    if str(base_model) in KNOWN_LICENSES:
        return KNOWN_LICENSES[str(base_model)]
    card_path: Optional[Path] = None
    base = Path(str(base_model))
    if base.is_dir():
        if (base / PROVENANCE_FILE).is_file():
            found = _read_json(base / PROVENANCE_FILE).get("license")
            if found:
                return found
        config = _read_json(base / "config.json")
        if config.get("license"):
            return str(config["license"])
        card_path = base / "README.md" if (base / "README.md").is_file() else None
    elif is_hub_id(base_model):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(base_model), "README.md")
            card_path = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 - a cache lookup never fails an export
            card_path = None
    if card_path is None:
        return None
    try:
        from huggingface_hub import ModelCard

        license_ = ModelCard.load(str(card_path)).data.license
    except Exception:  # noqa: BLE001 - a malformed card of the base model never fails an export
        return None
    return str(license_) if license_ else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_provenance(directory: Union[str, Path], fields: dict[str, Any]) -> Path:
    """Write :data:`PROVENANCE_FILE` (JSON) into ``directory``; ``None`` values are left out."""
    path = Path(directory) / PROVENANCE_FILE
    data = {k: v for k, v in fields.items() if v is not None}
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    return path


def read_provenance(source: Union[str, Path]) -> dict[str, Any]:
    """Card fields known about an export source directory (an export, an AST run, a pruned model), or ``{}``.

    Keys: ``base_model``, ``sparsity_method``, ``token_budget``, ``recipe``, ``evaluation``, ``license`` and
    ``reexported_from`` (set when the source is itself an hf_sparse export).
    """
    source = Path(source)
    found: dict[str, Any] = dict(_read_json(source / PROVENANCE_FILE))
    oneshot = _read_json(source / _ONESHOT_REPORT)
    if oneshot:
        found.setdefault("sparsity_method", f"{oneshot.get('method', 'one-shot')} (one-shot)")
        found.setdefault("base_model", oneshot.get("base_model") or oneshot.get("model"))
        found.setdefault("token_budget", 0)
        if oneshot.get("license"):
            found.setdefault("license", oneshot["license"])
        found.setdefault("recipe", {"hf-sparse prune": {k: v for k, v in oneshot.items() if k != "seconds"}})
    base = adapter_base_model(source)
    if base:
        found.setdefault("base_model", base)
        found.setdefault("sparsity_method", "AST")
    if "recipe" not in found and (source / _RECIPE_FILE).is_file():
        import yaml

        found["recipe"] = yaml.safe_load((source / _RECIPE_FILE).read_text(encoding="utf-8"))
    config = _read_json(source / "config.json")
    if (config.get("quantization_config") or {}).get("quant_method") == "hf_sparse" or found.get("export_format"):
        found["reexported_from"] = str(source.resolve())
    found.pop("export_format", None)
    found.pop("quant_method", None)
    if found.get("base_model") and "license" not in found:
        found["license"] = base_model_license(found["base_model"])
    return {k: v for k, v in found.items() if v is not None}


def check_adapter_base(adapter_dir: Union[str, Path]) -> str:
    """The base model an AST adapter directory needs, or a clear error before PEFT tries the Hub for ``None``."""
    base = adapter_base_model(adapter_dir)
    if not base:
        raise ValueError(
            f"{adapter_dir}/adapter_config.json records no base model (`base_model_name_or_path` is null), so the "
            "adapter cannot be loaded: set it to the model the run started from (a hub id or directory), or re-run "
            "`hf-sparse train` (which records it)"
        )
    looks_local = str(base).startswith(("/", ".", "~")) or os.sep in str(base) and not is_hub_id(base)
    if looks_local and not os.path.isdir(os.path.expanduser(str(base))):
        raise ValueError(
            f"{adapter_dir}/adapter_config.json: the base model directory {base!r} does not exist (moved or deleted?); "
            "edit `base_model_name_or_path` to where it is now"
        )
    return str(base)


def source_defaults(source_dir: Union[str, Path], tokenizer: Any, card: Optional[dict[str, Any]]) -> tuple[Any, dict]:
    """For an export read from ``source_dir``: the tokenizer to save (given one, else the source's) and the card
    fields (given ones win over what :func:`read_provenance` finds)."""
    fields = dict(read_provenance(source_dir))
    fields.update({k: v for k, v in (card or {}).items() if v is not None})
    return (tokenizer if tokenizer is not None else tokenizer_source(source_dir)), fields
