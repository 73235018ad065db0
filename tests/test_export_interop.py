"""--format compressed-tensors: an ordinary pack-quantized (or dense) checkpoint, zeros included."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from test_export import ast_model, rel_err
from transformers import AutoModelForCausalLM

import hf_sparse
from hf_sparse import is_nm_sparse
from hf_sparse.integrations.compressed_tensors import export_compressed_tensors

ct = pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, None)])
def test_transformers_loads_symmetric_pack_quantized(tmp_path, bits, group_size, input_ids):
    model = ast_model("llama")
    export_compressed_tensors(model, tmp_path / "ct", bits=bits, group_size=group_size)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    ref = hf_sparse.fake_quantize(copy.deepcopy(model), bits=bits, group_size=group_size)
    with torch.no_grad():
        assert rel_err(ref(input_ids).logits, loaded(input_ids).logits) <= 1e-5
    w = loaded.model.layers[0].mlp.up_proj.weight
    assert is_nm_sparse(w, 2, 4) and (w == 0).float().mean() >= 0.5  # zeros included, still 2:4


def test_asymmetric_checkpoint_decompresses_exactly_with_compressed_tensors(tmp_path):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from compressed_tensors.utils import replace_direct_state_dict
    from transformers import CompressedTensorsConfig

    model = ast_model("llama")
    export_compressed_tensors(model, tmp_path / "ct", bits=4, group_size=64, symmetric=False)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    state = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert state["model.layers.0.self_attn.q_proj.weight_zero_point"].dtype == torch.int32
    compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(qc))
    fresh = AutoModelForCausalLM.from_config(tiny_config("llama"))
    apply_quantization_config(fresh, compressor.quantization_config)
    for name, module in fresh.named_modules():
        if hasattr(module, "quantization_scheme"):
            replace_direct_state_dict(module, {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")})
            module.quantization_status = "compressed"
    compressor.decompress_model(fresh)
    ref = hf_sparse.fake_quantize(copy.deepcopy(model), bits=4, group_size=64, symmetric=False)
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]:
        assert torch.equal(ref.get_submodule(name).weight, fresh.get_submodule(name).weight), name


def test_bits16_is_a_plain_dense_checkpoint(tmp_path, input_ids):
    model = ast_model("gpt2")
    export_compressed_tensors(model, tmp_path / "dense", bits=16)
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    ref = hf_sparse.fake_quantize(copy.deepcopy(model), bits=16)
    with torch.no_grad():
        assert rel_err(ref(input_ids).logits, loaded(input_ids).logits) <= 1e-5


def test_refusals_are_clear(tmp_path):
    with pytest.raises(ValueError, match="SLoRB"):
        export_compressed_tensors(ast_model("llama", slorb=True), tmp_path / "x", bits=4, group_size=32)
    with pytest.raises(ValueError, match="Conv1D"):
        export_compressed_tensors(ast_model("gpt2"), tmp_path / "x", bits=4, group_size=32)
    with pytest.raises(ValueError, match="in_features divisible by argument `group_size`=128"):
        export_compressed_tensors(ast_model("llama"), tmp_path / "x", bits=4, group_size=128)  # 64 inputs
    assert not (tmp_path / "x").exists()


def test_cli_format_compressed_tensors(tmp_path, input_ids):
    from hf_sparse.cli import main

    model = ast_model("llama")
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    assert main(["export", str(tmp_path / "merged"), str(tmp_path / "ct"), "--bits", "8", "--group-size", "32",
                 "--format", "compressed-tensors"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    ref = hf_sparse.fake_quantize(copy.deepcopy(model), bits=8, group_size=32)
    with torch.no_grad():
        assert rel_err(ref(input_ids).logits, loaded(input_ids).logits) <= 1e-5
    assert "README.md" in {p.name for p in (tmp_path / "ct").iterdir()}
