"""Recipes: every shipped recipe validates; `hf-sparse train` runs the tiny one and saves it beside checkpoints."""

from __future__ import annotations

import glob
import json
import os

import pytest
import yaml

from hf_sparse.cli import main
from hf_sparse.training.recipe import RECIPE_FILE, RecipeError, load_recipe

RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")
ALL = sorted(glob.glob(os.path.join(RECIPES, "*.yaml")))


def test_expected_recipes_exist():
    names = {os.path.basename(p) for p in ALL}
    assert {"gpt2.yaml", "llama-2-7b.yaml", "opt-125m.yaml", "smollm2-135m.yaml", "tiny-cpu.yaml"} <= names


@pytest.mark.parametrize("path", ALL, ids=os.path.basename)
def test_recipe_validates(path):
    recipe = load_recipe(path)
    config = recipe.ast_config()
    assert (config.n, config.m) == (2, 4)
    assert recipe["data"]["block_size"] > 0


def test_paper_hyperparameters():
    gpt2 = load_recipe(os.path.join(RECIPES, "gpt2.yaml"))
    assert gpt2["training"]["learning_rate"] == 2e-4 and gpt2["training"]["max_steps"] == 40000
    assert gpt2["training"]["per_device_train_batch_size"] * gpt2["training"]["gradient_accumulation_steps"] == 128
    assert gpt2["data"]["block_size"] == 1024 and gpt2["training"]["adam_beta2"] == 0.95
    cfg = gpt2.ast_config()
    assert (cfg.masked_decay_peak, cfg.masked_decay_ramp_steps, cfg.mask_update_interval) == (1e-4, 10000, 10)
    assert gpt2["training"]["distill_alpha"] == 0.67 and gpt2["training"]["distill_temperature"] == 2.0
    llama = load_recipe(os.path.join(RECIPES, "llama-2-7b.yaml"))
    cfg = llama.ast_config()
    assert (cfg.masked_decay_peak, cfg.masked_decay_ramp_steps) == (6e-5, 3000)
    assert llama["training"]["max_steps"] == 15000 and llama["training"]["learning_rate"] == 2e-5
    assert llama["launch"]["num_processes"] == 8 and "full_shard" in llama["training"]["fsdp"]
    t = llama["training"]
    assert t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * 8 == 128


def test_overrides_and_clear_errors(tmp_path):
    tiny = os.path.join(RECIPES, "tiny-cpu.yaml")
    recipe = load_recipe(tiny, ["training.max_steps=7", "ast.use_slorb=true", "data.block_size=32"])
    assert recipe["training"]["max_steps"] == 7 and recipe.ast_config().use_slorb is True
    assert recipe["data"]["block_size"] == 32
    with pytest.raises(RecipeError, match=r"section `ast` has unknown key\(s\) \['nn'\]"):
        load_recipe(tiny, ["ast.nn=3"])
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe(tiny, ["max_steps=3"])
    with pytest.raises(RecipeError, match="section `ast`.*`n` must be smaller than `m`"):
        load_recipe(tiny, ["ast.n=4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"name_or_path": "x"}, "data": {"path": "x"},
                                   "training": {"output_dir": "o"}}))
    with pytest.raises(RecipeError, match="section `data` needs `block_size`"):
        load_recipe(str(bad))


def test_cli_trains_tiny_recipe_and_saves_it_beside_checkpoints(tmp_path, capsys):
    tiny = os.path.join(RECIPES, "tiny-cpu.yaml")
    out = tmp_path / "run"
    sets = ["--set", f"training.output_dir={out}", "--set", "training.max_steps=10", "--set", "training.save_steps=5",
            "--set", "training.eval_steps=5", "--set", "training.disable_tqdm=true"]
    assert main(["train", tiny, *sets]) == 0
    for folder in (out, out / "checkpoint-5", out / "checkpoint-10"):
        saved = yaml.safe_load((folder / RECIPE_FILE).read_text())
        assert saved["training"]["max_steps"] == 10 and saved["training"]["output_dir"] == str(out)
    assert (out / "adapter_model.safetensors").is_file() and (out / "ast_training.png").is_file()
    state = json.loads((out / "checkpoint-10" / "trainer_state.json").read_text())
    assert any("eval_loss" in h for h in state["log_history"])
    assert any("ast/flip_rate" in h for h in state["log_history"])
    # resume the same run for two more steps from its last checkpoint
    assert main(["train", tiny, *sets, "--set", "training.max_steps=12", "--resume"]) == 0
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    captured = capsys.readouterr()
    assert "done, 12 steps" in captured.out
    # the start of training says what the launch gave (item 10 of the HF-user issue), on the CLI too
    assert "ASTTrainer: distributed mode single, world size 1" in captured.err


def test_recipe_with_fsdp_is_refused_before_loading_anything(tmp_path):
    """`hf-sparse train` refuses FSDP1 from the recipe's arguments alone: the model path need not even exist.
    (FSDP2 is supported: tests/test_fsdp2.py.)"""
    from hf_sparse.training.cli import build_trainer
    from hf_sparse.training.recipe import load_recipe

    recipe = load_recipe(os.path.join(RECIPES, "tiny-cpu.yaml"), [
        "model.config=null", "model.name_or_path=/nonexistent/model", "training.fsdp=full_shard",
        "training.fsdp_config={version: 1}", f"training.output_dir={tmp_path}",
    ])
    with pytest.raises(NotImplementedError, match="does not support FSDP1"):
        build_trainer(recipe)
