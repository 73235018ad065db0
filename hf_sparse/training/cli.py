"""``hf-sparse train RECIPE.yaml [--set section.key=value ...]``: build the model, data and ASTTrainer, then train.

Library entry: :func:`build_trainer` (returns the ready ASTTrainer) so scripts and notebooks get the same run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Optional

import torch

from ..format import parse_dtype
from .recipe import Recipe, RecipeError, RecipeSaveCallback, load_recipe

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "run", "build_trainer"]



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe (see recipes/ and docs/training.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe entry, e.g. --set training.max_steps=100 (repeatable)")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="resume from the last checkpoint in output_dir, or from CHECKPOINT")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the resolved recipe, no training")


def _load_model(recipe: Recipe, section: str) -> Optional[torch.nn.Module]:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = recipe[section]
    if spec.get("config"):
        cfg = dict(spec["config"])
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise RecipeError(f"{recipe.path}: `{section}.config` needs `model_type` (e.g. llama)")
        seed = recipe["training"].get("seed", 42)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    if not spec.get("name_or_path"):
        return None
    kwargs: dict[str, Any] = {}
    if spec.get("dtype"):
        try:
            kwargs["dtype"] = parse_dtype(spec["dtype"], "model.dtype") or "auto"
        except ValueError as err:
            raise RecipeError(f"{recipe.path}: {err}") from None
    for key in ("gguf_file", "revision", "trust_remote_code"):
        if spec.get(key) is not None:
            kwargs[key] = spec[key]
    return AutoModelForCausalLM.from_pretrained(recipe.resolve_path(spec["name_or_path"]), **kwargs)


def _load_tokenizer(recipe: Recipe) -> Any:
    from .data import CharTokenizer

    spec = recipe["model"]
    name = spec.get("tokenizer") or spec.get("name_or_path")
    if name == "char":
        return CharTokenizer()
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": spec["gguf_file"]} if spec.get("gguf_file") and not spec.get("tokenizer") else {}
    return AutoTokenizer.from_pretrained(recipe.resolve_path(name), **kwargs)


def _load_data(recipe: Recipe, tokenizer: Any) -> tuple[Any, Any]:
    from .data import StreamingTextBlocks, TextBlocks, load_text, tokenize_text

    spec = recipe["data"]
    block = int(spec["block_size"])
    source = recipe.resolve_path(str(spec["path"]))
    if spec.get("streaming"):
        train = StreamingTextBlocks(source, tokenizer, block, config=spec.get("config"), split=spec.get("split", "train"),
                                    text_column=spec.get("text_column", "text"),
                                    shuffle_buffer=int(spec.get("shuffle_buffer") or 0))
        return train, None
    text = load_text(source, config=spec.get("config"), split=spec.get("split", "train"),
                     text_column=spec.get("text_column", "text"), max_chars=spec.get("max_chars"))
    blocks = TextBlocks(tokenize_text(text, tokenizer), block, spec.get("max_blocks"))
    fraction = float(spec.get("eval_fraction") or 0.0)
    if fraction <= 0:
        return blocks, None
    n_eval = max(1, int(len(blocks) * fraction))
    indices = list(range(len(blocks)))
    return (torch.utils.data.Subset(blocks, indices[:-n_eval]), torch.utils.data.Subset(blocks, indices[-n_eval:]))


BASE_MODEL_DIR = "_base_model"  # a config-built model's initial weights ("_*": not uploaded by Trainer.push_to_hub)


def _is_hf_tokenizer(tokenizer: Any) -> bool:
    from transformers import PreTrainedTokenizerBase

    return isinstance(tokenizer, PreTrainedTokenizerBase)


def record_base_model(recipe: Recipe, model: torch.nn.Module, args: Any, tokenizer: Any = None) -> str:
    """Make the saved adapter name its base model (PEFT reads ``model.name_or_path`` into
    ``adapter_config.json``'s ``base_model_name_or_path``), so ``hf-sparse export RUN_DIR`` can rebuild it.

    A hub id stays as is; a local directory becomes absolute (the export may run from another folder); a model built
    from ``model.config`` has no base on disk, so its initial weights (and the tokenizer, when it is a transformers
    one) are saved to ``output_dir/_base_model`` and that directory is recorded.
    """
    import os

    from ..atomic import atomic_directory

    spec = recipe["model"]
    if spec.get("name_or_path"):
        name = recipe.resolve_path(spec["name_or_path"])
        base = os.path.abspath(name) if os.path.exists(name) else name
    else:
        base = os.path.abspath(os.path.join(args.output_dir, BASE_MODEL_DIR))
        if args.should_save:
            with atomic_directory(base, overwrite=True, writer="hf_sparse.train") as tmp:
                model.save_pretrained(tmp)
                if _is_hf_tokenizer(tokenizer):
                    tokenizer.save_pretrained(tmp)
    model.name_or_path = base
    model.config._name_or_path = base
    return base


def build_trainer(recipe: Recipe):
    """Model, teacher, data and an ASTTrainer (with the recipe saved next to every checkpoint)."""
    from transformers import default_data_collator

    from .trainer import ASTTrainer, check_distributed_support

    args = recipe.training_arguments()
    check_distributed_support(args)  # FSDP1/DeepSpeed refused before a (possibly 13 GB) model is loaded
    ast_config = recipe.ast_config()
    model = _load_model(recipe, "model")
    teacher = _load_model(recipe, "teacher") if recipe["teacher"].get("name_or_path") else None
    tokenizer = _load_tokenizer(recipe)
    base = record_base_model(recipe, model, args, tokenizer)
    logger.info("hf-sparse train: base model %s (recorded in adapter_config.json)", base)
    train, evaluation = _load_data(recipe, tokenizer)
    extra = {"processing_class": tokenizer} if _is_hf_tokenizer(tokenizer) else {}  # saved with the adapter
    return ASTTrainer(
        model=model, args=args, teacher_model=teacher, ast_config=ast_config, train_dataset=train,
        eval_dataset=evaluation, data_collator=default_data_collator, callbacks=[RecipeSaveCallback(recipe)], **extra,
    )


def write_run_provenance(trainer: Any, recipe: Recipe) -> None:
    """``hf_sparse_provenance.json`` in ``output_dir``: what the export's model card states about this run."""
    import math
    import os

    from ..atomic import atomic_write_json
    from ..exporters.provenance import PROVENANCE_FILE, adapter_base_model, base_model_license

    out = trainer.args.output_dir
    base = adapter_base_model(out)
    args, state = trainer.args, trainer.state
    tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
    if not tokens:
        block = int(recipe["data"].get("block_size") or 0)
        tokens = (state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
                  * max(1, args.world_size) * block)
    evaluation = []
    evals = [h for h in state.log_history if "eval_loss" in h]
    if evals:
        loss = float(evals[-1]["eval_loss"])
        evaluation = [{"metric": f"eval loss (nats/token, step {evals[-1].get('step')})", "dense": None,
                       "sparse": round(loss, 4)},
                      {"metric": "eval perplexity", "dense": None, "sparse": round(math.exp(min(loss, 50.0)), 3)}]
    doc = {"base_model": base, "sparsity_method": "AST", "token_budget": tokens, "recipe": recipe.sections,
           "evaluation": evaluation or None, "license": base_model_license(base)}
    atomic_write_json({k: v for k, v in doc.items() if v is not None}, os.path.join(out, PROVENANCE_FILE),
                      indent=2, sort_keys=False, default=str)


def run(args: argparse.Namespace) -> int:
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        raise SystemExit(f"hf-sparse train: {err}") from None
    if args.dry_run:
        recipe.ast_config()
        print(recipe.to_yaml())
        return 0
    show_training_log()
    trainer = build_trainer(recipe)
    trainer.train(resume_from_checkpoint=args.resume)
    trainer.save_model()
    if trainer.args.should_save:
        recipe.save(trainer.args.output_dir)
        write_run_provenance(trainer, recipe)
    metrics = trainer.state.log_history[-1] if trainer.state.log_history else {}
    logger.info("AST training finished: %s", metrics)
    if trainer.is_world_process_zero():
        print(f"hf-sparse train: done, {trainer.state.global_step} steps; model and ast_recipe.yaml in "
              f"{trainer.args.output_dir}")
    return 0


def show_training_log() -> None:
    """Show hf_sparse's training INFO lines on stderr (the distributed mode and world size first: a launch that
    silently gave one process says so), unless the user's own logging already handles them."""
    log = logging.getLogger("hf_sparse.training")
    if any(isinstance(h, _CurrentStderrHandler) for h in log.handlers):
        return
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not the one at creation: tests swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass
