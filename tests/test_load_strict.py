"""Loading refuses checkpoints that would silently give random or NaN weights (issue 10, loading parts)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_export import ast_model
from test_load import copy_export, rewrite_tensors
from transformers import AutoModelForCausalLM

import hf_sparse
from hf_sparse.format import FormatError

Q = "model.layers.0.self_attn.q_proj"
LOGGER = "hf_sparse.integrations.transformers_quantizer"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("strict") / "int4"
    hf_sparse.export(ast_model("llama"), out, bits=4, group_size=32)
    return out


def hf_sparse_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def test_good_export_loads_without_warning(export_dir, caplog, input_ids):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = AutoModelForCausalLM.from_pretrained(export_dir)
    assert hf_sparse_warnings(caplog) == []
    with torch.no_grad():
        assert torch.isfinite(model(input_ids).logits).all()


def test_target_dropped_from_config_refuses_stray_packed_tensors(tmp_path, export_dir):
    d = copy_export(export_dir, tmp_path / "stray")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["targets"].remove(Q)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="quantization_config.targets does not list") as err:
        AutoModelForCausalLM.from_pretrained(d)
    assert f"{Q}.nm_values" in str(err.value) and f"{Q}.nm_positions" in str(err.value)
    assert f"{Q}.nm_scales" in str(err.value)


def test_missing_embedding_is_refused(tmp_path, export_dir):
    d = copy_export(export_dir, tmp_path / "noembed")
    rewrite_tensors(d, lambda t: t.pop("model.embed_tokens.weight"))
    with pytest.raises(FormatError, match=r"lacks 1 tensor\(s\) the model needs: model\.embed_tokens\.weight"):
        AutoModelForCausalLM.from_pretrained(d)


def test_tied_model_loads_and_missing_tied_source_is_refused(tmp_path):
    d = tmp_path / "gpt2"
    hf_sparse.export(ast_model("gpt2"), d, bits=4, group_size=32)
    AutoModelForCausalLM.from_pretrained(d)  # lm_head.weight is tied to transformer.wte.weight: not required
    rewrite_tensors(d, lambda t: t.pop("transformer.wte.weight"))
    with pytest.raises(FormatError, match="transformer.wte.weight"):
        AutoModelForCausalLM.from_pretrained(d)


def test_nan_in_int4_scales_is_refused(tmp_path, export_dir):
    d = copy_export(export_dir, tmp_path / "nanscale")
    rewrite_tensors(d, lambda t: t[f"{Q}.nm_scales"].__setitem__((0, 0), float("nan")))
    with pytest.raises(FormatError, match=rf"{Q}\.nm_scales holds NaN/inf values: corrupted checkpoint"):
        AutoModelForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("key", ["model.embed_tokens.weight", "model.layers.1.post_attention_layernorm.weight"])
def test_nan_in_dense_tensor_is_refused(tmp_path, export_dir, key):
    d = copy_export(export_dir, tmp_path / "nandense")
    rewrite_tensors(d, lambda t: t[key].view(-1).__setitem__(3, float("inf") if "norm" in key else float("nan")))
    with pytest.raises(FormatError, match=re.escape(key) + " holds NaN/inf values: corrupted checkpoint"):
        AutoModelForCausalLM.from_pretrained(d)


def test_shard_without_checksum_loads_with_a_warning(tmp_path, export_dir, caplog, input_ids):
    d = copy_export(export_dir, tmp_path / "nosum")
    file = d / "model.safetensors"
    save_file(load_file(str(file)), str(file), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = AutoModelForCausalLM.from_pretrained(d)
    warnings = hf_sparse_warnings(caplog)
    assert len(warnings) == 1 and str(file) in warnings[0] and "no checksum" in warnings[0]
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, AutoModelForCausalLM.from_pretrained(export_dir)(input_ids).logits)
