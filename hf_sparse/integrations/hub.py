"""The Hub upload of an export (its model card is rendered by :mod:`hf_sparse.exporters.model_card`).

:data:`UPLOAD_ALLOW_PATTERNS` / :data:`UPLOAD_IGNORE_PATTERNS`
define exactly what ``hf-sparse export --push-to-hub`` uploads; :func:`upload_file_set` computes that set
with huggingface_hub's own filter (the one ``upload_folder`` applies), so it can be checked offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from huggingface_hub.utils import filter_repo_objects

from ..exporters.provenance import PROVENANCE_FILE, TOKENIZER_FILES
from ..exporters.model_card import (  # re-exported: the card helpers lived here before
    TEMPLATE_PATH,
    create_model_card_for_trainer,
    read_template,
    render_model_card,
    write_model_card,
)

__all__ = [
    "TEMPLATE_PATH",
    "read_template",
    "UPLOAD_ALLOW_PATTERNS",
    "UPLOAD_IGNORE_PATTERNS",
    "render_model_card",
    "write_model_card",
    "upload_file_set",
    "push_export_to_hub",
    "TRAINER_IGNORE_PATTERNS",
    "trainer_upload_file_set",
    "create_model_card_for_trainer",
]

UPLOAD_ALLOW_PATTERNS = [
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "hf_sparse_recipe.json",
    PROVENANCE_FILE,
    "README.md",
    "tokenizer*",
    *[name for name in TOKENIZER_FILES if not name.startswith("tokenizer")],  # what save_tokenizer writes
    "recipe.yaml",
]
# never upload temp/hidden files or training leftovers that happen to sit beside an export
UPLOAD_IGNORE_PATTERNS = [".*", "*/.*", "*.tmp*", "checkpoint-*", "checkpoint-*/*", "runs/*", "*.pt", "*.bin", "*.pth"]


# what transformers' Trainer.push_to_hub() passes to upload_folder (transformers 5.x, trainer.py)
TRAINER_IGNORE_PATTERNS = ["_*", "checkpoint-*"]


def upload_file_set(directory: str | Path) -> list[str]:
    """The relative paths ``upload_folder(..., allow_patterns=..., ignore_patterns=...)`` would upload."""
    root = Path(directory).resolve()
    files = sorted(p.relative_to(root).as_posix() for p in root.glob("**/*") if p.is_file())
    return list(filter_repo_objects(files, allow_patterns=UPLOAD_ALLOW_PATTERNS, ignore_patterns=UPLOAD_IGNORE_PATTERNS))


def push_export_to_hub(directory: str | Path, repo_id: str, private: Optional[bool] = None, token: Optional[str] = None,
                       commit_message: str = "Upload hf_sparse export") -> Any:
    """Create ``repo_id`` if needed and upload the export's file set (network)."""
    from huggingface_hub import HfApi

    files = upload_file_set(directory)
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        raise ValueError(f"{directory} is not an export: it needs config.json and safetensors weights")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(directory),
        allow_patterns=UPLOAD_ALLOW_PATTERNS,
        ignore_patterns=UPLOAD_IGNORE_PATTERNS,
        commit_message=commit_message,
    )


def trainer_upload_file_set(output_dir: str | Path) -> list[str]:
    """The relative paths ``Trainer.push_to_hub()`` uploads from ``output_dir`` (everything but its ignores)."""
    root = Path(output_dir).resolve()
    files = sorted(p.relative_to(root).as_posix() for p in root.glob("**/*") if p.is_file())
    return list(filter_repo_objects(files, ignore_patterns=TRAINER_IGNORE_PATTERNS))
