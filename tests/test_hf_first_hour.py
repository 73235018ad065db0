"""What a Hugging Face user hits in the first hour (issue #18 items 2, 4, 5, 8, 10): exports carry the tokenizer and
chat template, `train` records its base model, a dense model is never magnitude-pruned silently, model cards state
the real provenance, and the CLI answers `--help`/`--version`/errors the way CLIs do. Real tiny models, real files."""

from __future__ import annotations

import json
import logging
import os
import shutil
from argparse import ArgumentParser
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from tiny_chat_tokenizer import tiny_chat_model, tiny_chat_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import hf_sparse
from hf_sparse.cli import VERBS, main
from hf_sparse.exporters.model_card import render_model_card
from hf_sparse.exporters.provenance import PROVENANCE_FILE
from hf_sparse.format import NMSpec
from hf_sparse.integrations.hub import upload_file_set

ROOT = Path(__file__).resolve().parents[1]
HAMLET = ROOT / "tests" / "data" / "hamlet_act1.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory) -> Path:
    """A tiny dense instruct model with a real tokenizer, a chat template and a model card naming its license."""
    path = tmp_path_factory.mktemp("chat-base") / "tiny-instruct"
    tok = tiny_chat_tokenizer()
    tiny_chat_model(tok, seed=3).save_pretrained(path)
    tok.save_pretrained(path)
    (path / "README.md").write_text("---\nlicense: mit\n---\n\n# tiny instruct\n", encoding="utf-8")
    return path


def _card(directory: Path) -> tuple[ModelCard, str]:
    card = ModelCard.load(directory / "README.md")
    return card, str(card)


# ------------------------------------------------------------------------------ item 2 + item 8 (prune -> export)
def test_prune_then_export_carries_tokenizer_chat_template_and_provenance(chat_base, tmp_path, capsys):
    pruned, out, again = tmp_path / "pruned", tmp_path / "export", tmp_path / "reexport"
    assert main(["prune", "--method", "wanda", "--model", str(chat_base), "--calibration-file", str(HAMLET),
                 "--num-samples", "4", "--seq-len", "64", "--output-dir", str(pruned)]) == 0
    assert main(["export", str(pruned), str(out), "--bits", "4", "--group-size", "32"]) == 0
    for name in TOKENIZER_FILES:  # copied byte for byte, and uploaded
        assert (out / name).read_bytes() == (pruned / name).read_bytes(), name
        assert name in upload_file_set(out), name
    assert PROVENANCE_FILE in upload_file_set(out)
    # what failed before: "Couldn't instantiate the backend tokenizer" / no chat template
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    generator = pipeline("text-generation", model=str(out), device="cpu")
    assert isinstance(generator("Hi", max_new_tokens=3, do_sample=False)[0]["generated_text"], str)
    assert main(["eval", "--model", str(out), "--text-file", str(HAMLET), "--max-tokens", "256", "--max-length", "64",
                 "--stride", "32", "--no-progress"]) == 0

    card, text = _card(out)
    assert "sparsified with wanda (one-shot)" in text and "AST" not in text.split("## Recipe")[0]
    assert f"| Base model | {chat_base} |" in text and "huggingface.co//" not in text
    assert card.data.base_model is None  # a local path is not a Hub id: no broken link in the metadata either
    assert card.data.license == "mit" and "| License | mit |" in text  # from the base model's own card
    assert "0 (one-shot, no training)" in text and "hf-sparse prune" in text and "method: wanda" in text

    # re-export of an export: the same provenance, and says where it came from
    assert main(["export", str(out), str(again), "--bits", "8", "--group-size", "32"]) == 0
    card2, text2 = _card(again)
    assert f"Re-exported from the hf_sparse export `{out}`" in text2
    assert f"| Base model | {chat_base} |" in text2 and "huggingface.co//" not in text2
    assert "sparsified with wanda (one-shot)" in text2 and card2.data.license == "mit"
    assert "0 (one-shot, no training)" in text2 and "n/a (one-shot)" not in text2
    assert (again / "chat_template.jinja").read_bytes() == (pruned / "chat_template.jinja").read_bytes()


# ------------------------------------------------------------------------------ item 5 + item 2 + item 8 (train)
def _write_recipe(folder: Path, model: dict, steps: int = 2) -> Path:
    recipe = {
        "model": model,
        "data": {"path": str(HAMLET), "block_size": 32, "eval_fraction": 0.1},
        "ast": {"n": 2, "m": 4, "mask_update_interval": 1},
        "training": {"output_dir": str(folder / "run"), "max_steps": steps, "per_device_train_batch_size": 4,
                     "learning_rate": 1e-3, "save_strategy": "no", "eval_strategy": "steps", "eval_steps": steps,
                     "use_cpu": True, "report_to": [], "disable_tqdm": True, "logging_steps": 1, "seed": 0},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained_run(chat_base, tmp_path_factory) -> Path:
    """`hf-sparse train` on a model given by a path *relative to the recipe*, as recipes/ do."""
    folder = tmp_path_factory.mktemp("train")
    shutil.copytree(chat_base, folder / "base")
    assert main(["train", str(_write_recipe(folder, {"name_or_path": "base"}))]) == 0
    return folder / "run"


def test_train_records_base_model_and_the_run_exports_from_anywhere(trained_run, tmp_path, monkeypatch):
    config = json.loads((trained_run / "adapter_config.json").read_text())
    base = config["base_model_name_or_path"]
    assert base and os.path.isabs(base) and Path(base).is_dir()  # was null: export asked the Hub for None/config.json
    monkeypatch.chdir(tmp_path)  # the relative recipe path must not matter any more
    assert main(["export", str(trained_run), "e", "--bits", "4", "--group-size", "32"]) == 0
    out = tmp_path / "e"
    assert (out / "chat_template.jinja").is_file() and (out / "tokenizer.json").is_file()
    AutoModelForCausalLM.from_pretrained(out)  # loads
    card, text = _card(out)
    assert "sparsified with AST" in text and "| Sparsity method | AST |" in text
    assert f"| Base model | {base} |" in text and card.data.license == "mit"
    assert "eval perplexity" in text and "No evaluation recorded" not in text  # what train measured
    assert "max_steps: 2" in text and "No recipe recorded" not in text
    tokens = json.loads((trained_run / PROVENANCE_FILE).read_text())["token_budget"]
    assert tokens == 2 * 4 * 32 and f"| Training tokens | {tokens:,} |" in text


def test_train_of_a_config_built_model_saves_and_records_its_base(tmp_path):
    tiny = ROOT / "recipes" / "tiny-cpu.yaml"
    out = tmp_path / "run"
    assert main(["train", str(tiny), "--set", f"training.output_dir={out}", "--set", "training.max_steps=2",
                 "--set", "training.save_strategy='no'", "--set", "training.eval_steps=2",
                 "--set", "training.disable_tqdm=true"]) == 0
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(out / "_base_model") and (out / "_base_model" / "model.safetensors").is_file()
    assert main(["export", str(out), str(tmp_path / "e")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "e") is not None


def test_adapter_without_base_model_is_one_clear_error(trained_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (broken / "adapter_config.json").write_text(json.dumps(config))
    assert main(["export", str(broken), str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert "hf-sparse export: error:" in err[0] and "base_model_name_or_path" in err[0] and "--debug" in err[0]
    with pytest.raises(ValueError, match="records no base model"):
        main(["export", str(broken), str(tmp_path / "e"), "--debug"])
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (broken / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not exist"):
        main(["--debug", "export", str(broken), str(tmp_path / "e")])


# ------------------------------------------------------------------------------ item 4 (optimum)
def _optimum(argv: list[str]) -> None:
    from hf_sparse.optimum.commands import HfSparseExportCommand

    parser = ArgumentParser()
    HfSparseExportCommand.parse_args(parser)
    HfSparseExportCommand(None, args=parser.parse_args(argv), from_defaults_factory=True, parser=parser).run()


def test_optimum_magnitude_pruning_of_a_dense_model_warns_loudly(chat_base, tmp_path, caplog, capsys):
    out = tmp_path / "mag"
    with caplog.at_level(logging.WARNING, logger="hf_sparse.optimum.quantizer"):
        _optimum(["-m", str(chat_base), str(out), "--bits", "4", "--group-size", "32"])
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("destroys" in w and "--prune sparsegpt" in w and "hf-sparse train" in w for w in warned), warned
    err = capsys.readouterr().err
    assert "WARNING:" in err and "magnitude-pruned" in err and "--prune sparsegpt" in err
    assert "sparsified with magnitude (one-shot)" in _card(out)[1]
    assert (out / "chat_template.jinja").is_file()

    caplog.clear()
    calibrated = tmp_path / "sgpt"
    with caplog.at_level(logging.WARNING, logger="hf_sparse.optimum.quantizer"):
        _optimum(["-m", str(chat_base), str(calibrated), "--bits", "4", "--group-size", "32", "--prune", "sparsegpt",
                  "--calibration-file", str(HAMLET), "--num-samples", "4", "--seq-len", "64"])
    assert not [r for r in caplog.records if "destroys" in r.getMessage()]
    assert "WARNING:" not in capsys.readouterr().err
    assert "sparsified with sparsegpt (one-shot)" in _card(calibrated)[1]
    with pytest.raises(SystemExit, match="--calibration-file"):
        _optimum(["-m", str(chat_base), str(tmp_path / "x"), "--prune", "sparsegpt"])


def test_optimum_on_an_already_sparse_model_does_not_warn(chat_base, tmp_path, caplog):
    pruned = tmp_path / "pruned"
    assert main(["prune", "--method", "sparsegpt", "--model", str(chat_base), "--calibration-file", str(HAMLET),
                 "--num-samples", "4", "--seq-len", "64", "--output-dir", str(pruned)]) == 0
    with caplog.at_level(logging.WARNING, logger="hf_sparse.optimum.quantizer"):
        _optimum(["-m", str(pruned), str(tmp_path / "e"), "--bits", "4", "--group-size", "32"])
    assert not [r for r in caplog.records if "destroys" in r.getMessage()]
    assert "sparsified with sparsegpt (one-shot)" in _card(tmp_path / "e")[1]  # the prune step's provenance


# ------------------------------------------------------------------------------ item 8 (card fields)
def test_card_fields_have_distinct_names_and_the_old_method_keyword_still_works():
    spec = NMSpec(bits=4, group_size=32, targets=["a"])
    text = str(render_model_card(spec, None, quant_method="gptq", sparsity_method="sparsegpt (one-shot)"))
    assert "int4, group size 32, symmetric, gptq" in text and "sparsified with sparsegpt (one-shot)" in text
    old_quant = str(render_model_card(spec, None, method="gptq"))  # export's old meaning
    assert "symmetric, gptq" in old_quant and "sparsified with an unrecorded method" in old_quant
    old_label = str(render_model_card(spec, None, method="ast", token_budget=65_536))  # the demo's old meaning
    assert "sparsified with AST" in old_label and "symmetric, rtn" in old_label and "65,536" in old_label


def test_compressed_tensors_card_says_how_to_load_that_format(chat_base, tmp_path):
    pytest.importorskip("compressed_tensors")
    pruned = tmp_path / "pruned"
    assert main(["prune", "--method", "magnitude", "--model", str(chat_base), "--output-dir", str(pruned)]) == 0
    out = tmp_path / "ct"
    assert main(["export", str(pruned), str(out), "--bits", "4", "--group-size", "32",
                 "--format", "compressed-tensors"]) == 0
    card, text = _card(out)
    how_to_load = text.split("## How to load")[1]
    assert "import hf_sparse" not in how_to_load and "compressed-tensors" in how_to_load
    assert "compressed-tensors" in card.data.tags and "pack-quantized int4" in text
    assert (out / "chat_template.jinja").is_file() and "chat_template.jinja" in upload_file_set(out)


# ------------------------------------------------------------------------------ item 10 (CLI)
def test_version_and_every_verbs_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"hf-sparse {hf_sparse.__version__}"
    expected = {"demo": "(default: ", "train": "(default: ", "prune": "(default: 32)", "export": "(default: 128)",
                "eval": "(default: 512)"}
    assert set(expected) == set(VERBS)
    for verb, needle in expected.items():
        with pytest.raises(SystemExit) as exit_info:
            main([verb, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and needle in out and "--debug" in out, verb


def test_optimum_help_shows_defaults():
    from hf_sparse.optimum.commands import HfSparseExportCommand

    parser = ArgumentParser()
    HfSparseExportCommand.parse_args(parser)
    text = " ".join(parser.format_help().split())  # argparse wraps lines
    assert "(default: magnitude)" in text and "(default: 128)" in text and "destroys" in text


def test_cli_errors_are_one_line_and_debug_gives_the_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"name_or_path": "x"}, "data": {"path": "x", "block_size": 8},
                                   "training": {"output_dir": str(tmp_path / "o"), "save_strategy": False}}))
    assert main(["train", str(bad)]) == 1  # used to end in a RecipeError traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-sparse train: error: RecipeError:"), err
    from hf_sparse.training.recipe import RecipeError

    with pytest.raises(RecipeError):
        main(["train", str(bad), "--debug"])
    with pytest.raises(RecipeError):
        main(["--debug", "train", str(bad)])


def test_update_model_card_adds_what_was_measured_after_the_export(chat_base, tmp_path):
    """The demo measures its export after reloading it: the card gets the table then (the export stays ours)."""
    from hf_sparse.atomic import is_previous_output
    from hf_sparse.exporters.model_card import update_model_card

    model = tiny_chat_model(tiny_chat_tokenizer(), seed=4)
    hf_sparse.prune_oneshot(model, "magnitude")
    out = tmp_path / "e"
    hf_sparse.export(model, out, bits=4, group_size=32, card={"method": "ast", "base_model": "org/base",
                                                               "token_budget": 65_536})
    assert "No evaluation recorded" in _card(out)[1]
    update_model_card(out, evaluation=[{"metric": "held-out ppl", "dense": 42.33, "sparse": 59.08}],
                      recipe={"max_steps": 64})
    card, text = _card(out)
    assert "| held-out ppl | 42.33 | 59.08 |" in text and "max_steps: 64" in text
    assert "sparsified with AST" in text and "65,536" in text and card.data.base_model == "org/base"
    assert "int4, group size 32, symmetric, rtn" in text
    assert is_previous_output(out)
    with pytest.raises(ValueError, match="not an hf_sparse export"):
        update_model_card(chat_base)


def test_license_comes_from_the_base_models_card_or_the_bundled_models_known_one(chat_base):
    spec = NMSpec(bits=16, targets=["a"])
    assert render_model_card(spec, None, base_model=str(chat_base)).data.license == "mit"
    assert render_model_card(spec, None, base_model="HuggingFaceTB/SmolLM2-135M-Instruct").data.license == "apache-2.0"
    assert render_model_card(spec, None, base_model="org/unknown").data.license is None


def test_trainer_warns_when_the_adapter_will_name_no_base_model(caplog):
    from conftest import tiny_model

    from hf_sparse import ASTTrainer, ASTTrainingArguments

    args = ASTTrainingArguments(output_dir="unused", use_cpu=True, report_to=[], distill_alpha=0.0)
    with caplog.at_level(logging.WARNING, logger="hf_sparse.training.trainer"):
        ASTTrainer(model=tiny_model("llama"), args=args)
    assert any("names no base model" in r.getMessage() for r in caplog.records)
    caplog.clear()
    named = tiny_model("llama")
    named.name_or_path = "org/base"
    with caplog.at_level(logging.WARNING, logger="hf_sparse.training.trainer"):
        ASTTrainer(model=named, args=args)
    assert not any("names no base model" in r.getMessage() for r in caplog.records)


def test_trainer_push_to_hub_card_keeps_the_exports_provenance(tmp_path):
    from conftest import tiny_model
    from transformers import Trainer, TrainingArguments

    from hf_sparse.exporters.model_card import create_model_card_for_trainer

    model = tiny_model("llama")
    hf_sparse.prune_oneshot(model, "magnitude")
    out = tmp_path / "e"
    hf_sparse.export(model, out, bits=4, group_size=32, card={"sparsity_method": "sparsegpt (one-shot)",
                                                               "base_model": "org/base", "token_budget": 0})
    trainer = Trainer(model=tiny_model("llama"), args=TrainingArguments(output_dir=str(out), report_to=[],
                                                                         use_cpu=True))
    assert create_model_card_for_trainer(trainer)
    card, text = _card(out)
    assert "sparsified with sparsegpt (one-shot)" in text and card.data.base_model == "org/base"
    assert "0 (one-shot, no training)" in text
