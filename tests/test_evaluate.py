"""hf_sparse.evaluation and `hf-sparse eval` on tiny real models (no network)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_model
from tiny_chat_tokenizer import tiny_chat_model, tiny_chat_tokenizer

from hf_sparse.evaluation import (
    ReferenceLogprobs,
    evaluate_lm,
    kl_to_reference,
    lm_eval_tasks,
    perplexity,
    reference_logprobs,
    sliding_windows,
    tokenize_texts,
)


def _stream(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,max_length,stride", [(100, 32, 8), (100, 32, 31), (33, 32, 16), (64, 32, 16), (5, 32, 16)])
def test_sliding_windows_score_each_token_exactly_once(n, max_length, stride):
    counts = torch.zeros(n, dtype=torch.long)
    for begin, end, scored in sliding_windows(n, max_length, stride):
        assert end - begin <= max_length and scored <= end - begin - 1
        counts[end - scored : end] += 1
    assert counts[0] == 0 and torch.all(counts[1:] == 1)


def test_sliding_windows_without_overlap_skip_window_starts():
    windows = sliding_windows(96, 32, 32)
    assert [w[2] for w in windows] == [31, 31, 31]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_perplexity_one_window_equals_exp_mean_ce(arch):
    model = tiny_model(arch)
    ids = _stream(40)
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    expected = math.exp(F.cross_entropy(logits[:-1], ids[1:]).item())
    assert perplexity(model, ids, max_length=64, stride=32, progress=False) == pytest.approx(expected, rel=1e-5)


def _docs_reference_nll(model, ids, max_length, stride):
    """The transformers docs' loop: labels -100 on the overlap, the model's own shifted loss."""
    total, count, prev_end = 0.0, 0, 0
    seq_len = ids.numel()
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        window = ids[begin:end][None]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=labels).loss
        n_valid = (labels[:, 1:] != -100).sum().item()
        total += loss.item() * n_valid
        count += n_valid
        prev_end = end
        if end == seq_len:
            break
    return total, count


@pytest.mark.parametrize("batch_size", [1, 3])
def test_sliding_perplexity_matches_the_transformers_docs_loop(batch_size):
    model = tiny_model("llama")
    ids = _stream(150)
    total, count = _docs_reference_nll(model, ids, 48, 16)
    out = evaluate_lm(model, ids, max_length=48, stride=16, batch_size=batch_size, progress=False)
    assert out["tokens"] == count == 149
    assert out["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_restores_training_mode_and_rejects_bad_input():
    model = tiny_model("llama").train()
    perplexity(model, _stream(20), max_length=16, stride=8, progress=False)
    assert model.training
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, torch.zeros(2, 10, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, _stream(20), max_length=8, stride=9, progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, _stream(1), progress=False)


def test_kl_to_itself_is_zero_and_positive_to_another_model():
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = _stream(120)
    assert kl_to_reference(model, model, ids, max_length=48, stride=16, progress=False) == pytest.approx(0, abs=1e-6)
    kl = kl_to_reference(other, model, ids, max_length=48, stride=16, progress=False)
    assert kl > 1e-3
    # computed by hand on one window
    short = ids[:40]
    with torch.no_grad():
        p = torch.log_softmax(model(short[None]).logits[0, :-1], -1)
        q = torch.log_softmax(other(short[None]).logits[0, :-1], -1)
    by_hand = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl_to_reference(other, model, short, max_length=64, stride=32, progress=False) == pytest.approx(by_hand, rel=1e-5)


def test_reference_cache_full_is_exact_and_top_k_is_a_close_lower_bound(tmp_path):
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = _stream(120)
    exact = kl_to_reference(other, model, ids, max_length=48, stride=16, temperature=2.0, progress=False)
    full = reference_logprobs(model, ids, max_length=48, stride=16, temperature=2.0, top_k=None, progress=False)
    assert full.top_k is None and full.logprobs.shape == (119, VOCAB)
    assert kl_to_reference(other, full, ids, max_length=48, stride=16, temperature=2.0,
                           progress=False) == pytest.approx(exact, rel=1e-5)
    # all but one token kept: the one-token "rest" bucket is exact
    almost = reference_logprobs(model, ids, max_length=48, stride=16, temperature=2.0, top_k=VOCAB - 1, progress=False)
    assert kl_to_reference(other, almost, ids, max_length=48, stride=16, temperature=2.0,
                           progress=False) == pytest.approx(exact, rel=1e-4)
    top = reference_logprobs(model, ids, max_length=48, stride=16, temperature=2.0, top_k=24, progress=False)
    assert top.top_k == 24 and top.nbytes() < full.nbytes()
    approx = kl_to_reference(other, top, ids, max_length=48, stride=16, temperature=2.0, progress=False)
    assert 0 < approx <= exact + 1e-7  # coarsening never increases KL
    top.save(str(tmp_path / "ref.safetensors"))
    loaded = ReferenceLogprobs.load(str(tmp_path / "ref.safetensors"))
    assert kl_to_reference(other, loaded, ids, max_length=48, stride=16, temperature=2.0,
                           progress=False) == pytest.approx(approx, rel=1e-6)
    with pytest.raises(ValueError, match="stride"):
        kl_to_reference(other, top, ids, max_length=48, stride=8, temperature=2.0, progress=False)
    with pytest.raises(ValueError, match="different `input_ids`"):
        kl_to_reference(other, top, _stream(120, seed=9), max_length=48, stride=16, temperature=2.0, progress=False)


def test_evaluate_lm_gives_ppl_and_kl_in_one_pass():
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = _stream(100)
    out = evaluate_lm(other, ids, reference=model, max_length=32, stride=16, progress=False)
    assert out["perplexity"] == pytest.approx(perplexity(other, ids, 32, 16, progress=False), rel=1e-6)
    assert out["kl"] == pytest.approx(kl_to_reference(other, model, ids, 32, 16, progress=False), rel=1e-6)


def test_tokenize_texts_joins_documents_with_eos():
    tok = tiny_chat_tokenizer()
    ids = tokenize_texts(tok, ["ab", "c d"])
    a, b, c, d, space = (tok.convert_tokens_to_ids(x) for x in ["a", "b", "c", "d", " "])
    assert ids.tolist() == [a, b, tok.eos_token_id, c, space, d, tok.eos_token_id]
    with pytest.raises(TypeError, match="list"):
        tokenize_texts(tok, "ab")


def test_cli_eval_on_a_saved_tiny_model(tmp_path, capsys):
    from hf_sparse.cli import main

    tok = tiny_chat_tokenizer()
    for name, seed in [("model", 0), ("dense", 1)]:
        tiny_chat_model(tok, seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    text = tmp_path / "held.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 12)
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", str(tmp_path / "model"), "--text-file", str(text), "--reference",
               str(tmp_path / "dense"), "--max-length", "64", "--stride", "32", "--device", "cpu",
               "--json", str(out), "--no-progress", "--chat"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert "perplexity" in capsys.readouterr().out
    model = tiny_chat_model(tok, seed=0)
    ids = tokenize_texts(tok, [text.read_text()])
    assert result["tokens"] == ids.numel() - 1
    assert result["perplexity"] == pytest.approx(perplexity(model, ids, 64, 32, progress=False), rel=1e-5)
    assert result["kl"] > 0
    assert len(result["chat"]) == 40 and 0.0 <= result["chat_accuracy"] <= 1.0


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm_eval is installed")
def test_lm_eval_tasks_without_lm_eval_says_how_to_install(tmp_path):
    with pytest.raises(ImportError, match=r"hf-sparse\[eval\]"):
        lm_eval_tasks(tiny_model("llama"), tiny_chat_tokenizer(), str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm_eval (the `eval` extra) not installed")
def test_lm_eval_runs_a_local_task_offline(tmp_path):
    tok = tiny_chat_tokenizer()
    model = tiny_chat_model(tok)
    rows = [{"question": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1)], "label": 0}
            for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_sums.yaml").write_text(
        "task: tiny_sums\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    results = lm_eval_tasks(model, tok, str(tmp_path / "tiny_sums.yaml"), batch_size=2)
    # by hand: the choice with the highest log-likelihood of " choice" after the question
    correct = 0
    for row in rows:
        scores = []
        for choice in row["choices"]:
            ctx = tok(row["question"], add_special_tokens=False)["input_ids"]
            cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0], -1)
            scores.append(sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["label"])
    assert results["tiny_sums"]["acc,none"] == pytest.approx(correct / len(rows))
    assert "tiny_sums" in lm_eval_tasks(model, tok, str(tmp_path), batch_size=2, limit=2)  # a folder of tasks


def test_old_import_paths_and_chat_eval_entry_still_work():
    import subprocess
    import sys

    import hf_sparse.chat_eval as chat_eval
    import hf_sparse.evaluate as evaluate
    import hf_sparse.evaluation as evaluation

    for name in evaluate.__all__:
        assert getattr(evaluate, name) is getattr(evaluation, name)
    for name in chat_eval.__all__:
        assert getattr(chat_eval, name) is getattr(evaluation, name)
    code = ("import sys, runpy; import hf_sparse.evaluation; "
            "assert not [m for m in sys.modules if m.startswith('hf_sparse.training')], 'evaluation imports training'; "
            "sys.argv = ['x', '--help']; runpy.run_module('hf_sparse.chat_eval', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "generate-teacher-data" in out.stdout and "python -m hf_sparse.chat_eval" in out.stdout
