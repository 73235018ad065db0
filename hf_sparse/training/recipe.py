"""AST recipes: one YAML file says model, data, N:M + schedule (ASTConfig), distillation and training arguments.

```yaml
model: {name_or_path: gpt2, dtype: float32}      # or {config: {model_type: llama, ...}, tokenizer: char}
teacher: {name_or_path: null}                     # null: frozen copy of the model's dense weights
data: {path: allenai/c4, config: en, block_size: 1024, streaming: true}   # or a local .txt file / folder
ast: {n: 2, m: 4, mask_update_interval: 10, masked_decay_peak: 1.0e-4}     # ASTConfig fields
training: {output_dir: out/gpt2-ast, max_steps: 40000, distill_alpha: 0.67} # ASTTrainingArguments fields
```

``--set section.key=value`` overrides any entry (values parsed as YAML). The resolved recipe is saved as
``ast_recipe.yaml`` in ``output_dir`` and next to every checkpoint, so a run can be reproduced from its files.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Optional

import yaml
from transformers import TrainerCallback

from ..atomic import atomic_write_text
from ..tuners.ast.config import ASTConfig
from .arguments import ASTTrainingArguments

__all__ = ["Recipe", "RecipeError", "RecipeSaveCallback", "load_recipe", "RECIPE_FILE"]

RECIPE_FILE = "ast_recipe.yaml"

_SECTIONS: dict[str, set[str]] = {
    "model": {"name_or_path", "config", "tokenizer", "dtype", "gguf_file", "trust_remote_code", "revision"},
    "teacher": {"name_or_path", "gguf_file", "revision"},
    "data": {"path", "config", "split", "text_column", "block_size", "max_chars", "max_blocks", "streaming",
             "shuffle_buffer", "eval_fraction"},
    "ast": {f.name for f in dataclasses.fields(ASTConfig) if f.init},
    "training": {f.name for f in dataclasses.fields(ASTTrainingArguments) if f.init},
    "launch": {"num_processes", "distributed", "notes"},
}
_REQUIRED = {"model": (), "data": ("path", "block_size"), "training": ("output_dir",)}


class RecipeError(ValueError):
    """A recipe that cannot run: names the file, the section and the key."""


@dataclasses.dataclass
class Recipe:
    sections: dict[str, dict[str, Any]]
    path: Optional[str] = None

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.sections.get(section) or {}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.sections, sort_keys=False)

    def ast_config(self) -> ASTConfig:
        try:
            return ASTConfig(**self["ast"])
        except (TypeError, ValueError) as err:
            raise RecipeError(f"{self.path}: section `ast`: {err}") from err

    def training_arguments(self) -> ASTTrainingArguments:
        try:
            return ASTTrainingArguments(**self["training"])
        except (TypeError, ValueError) as err:
            raise RecipeError(f"{self.path}: section `training`: {err}") from err

    def resolve_path(self, value: str) -> str:
        """Local paths resolve against the recipe's folder first, then the working directory."""
        value = os.path.expandvars(os.path.expanduser(value))
        if self.path and not os.path.isabs(value):
            beside = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(self.path)), value))
            if os.path.exists(beside):
                return beside
        return value

    def save(self, folder: str) -> str:
        """Write ``ast_recipe.yaml`` into ``folder`` atomically."""
        target = os.path.join(folder, RECIPE_FILE)
        atomic_write_text(self.to_yaml(), target)
        return target


def _apply_override(sections: dict, assignment: str, where: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or "." not in key:
        raise RecipeError(f"{where}: `--set {assignment}` must look like section.key=value (e.g. training.max_steps=10)")
    section, _, name = key.partition(".")
    value = yaml.safe_load(raw) if raw != "" else None
    node = sections.setdefault(section, {}) or {}
    sections[section] = node
    parts = name.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def validate(sections: dict, where: str) -> None:
    for section, body in sections.items():
        if section not in _SECTIONS:
            raise RecipeError(f"{where}: unknown section `{section}` (known: {', '.join(_SECTIONS)})")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise RecipeError(f"{where}: section `{section}` must be a mapping, got {type(body).__name__}")
        unknown = sorted(set(body) - _SECTIONS[section])
        if unknown:
            raise RecipeError(f"{where}: section `{section}` has unknown key(s) {unknown}")
    for section, keys in _REQUIRED.items():
        for key in keys:
            if (sections.get(section) or {}).get(key) in (None, ""):
                raise RecipeError(f"{where}: section `{section}` needs `{key}`")
    model = sections.get("model") or {}
    if bool(model.get("name_or_path")) == bool(model.get("config")):
        raise RecipeError(f"{where}: section `model` needs exactly one of `name_or_path` or `config`")
    if model.get("config") and not model.get("tokenizer"):
        raise RecipeError(f"{where}: section `model` with `config` needs `tokenizer` (a path/hub id, or 'char')")
    try:
        ASTConfig(**(sections.get("ast") or {}))
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: section `ast`: {err}") from err


def load_recipe(path: str, overrides: Optional[list[str]] = None) -> Recipe:
    """Read, override (``section.key=value``) and validate a recipe file."""
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        sections = yaml.safe_load(f) or {}
    if not isinstance(sections, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of sections, got {type(sections).__name__}")
    sections = copy.deepcopy(sections)
    for assignment in overrides or []:
        _apply_override(sections, assignment, path)
    validate(sections, path)
    return Recipe(sections=sections, path=path)


class RecipeSaveCallback(TrainerCallback):
    """Saves the resolved recipe into ``output_dir`` at the start and next to every checkpoint."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    def on_train_begin(self, args, state, control, **kwargs):
        if args.should_save:
            self.recipe.save(args.output_dir)
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            self.recipe.save(folder)
        return control
