"""Format version 2 renamed SLoRB's tensors (``slorb.S/X`` -> ``slorb.weight/projection``); version 1 files,
hf_sparse 0.1 adapters and hf_sparse 0.1 merged checkpoints still load, with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_sparse
from hf_sparse import ASTConfig
from hf_sparse.checksum import tensor_checksum
from hf_sparse.format import CHECKSUM_KEY, FORMAT_VERSION, LEGACY_SLORB_KEYS, VERSION_KEY, FormatError, NMSpec
from hf_sparse.modules import PackedNMLinear, SparseLinear
from hf_sparse.tuners.ast import ASTLayer


def slorb_model(train_projection: bool):
    model = get_peft_model(tiny_model("llama"), ASTConfig(use_slorb=True, slorb_group_size=16,
                                                         slorb_train_projection=train_projection))
    with torch.no_grad():  # a clearly non-zero branch, so a dropped or misnamed one shows in the logits
        for layer in model.modules():
            if isinstance(layer, ASTLayer):
                for branch in layer.ast_slorb.values():
                    branch.weight.add_(0.05 * torch.randn_like(branch.weight))
                    if branch.projection is not None:
                        branch.projection.add_(0.01 * torch.randn_like(branch.projection))
    return model


def legacy_name(key: str) -> str:
    """``<module>.slorb.weight`` (export) or ``<module>.ast_slorb.weight`` (adapter) under hf_sparse 0.1's name."""
    for old, new in LEGACY_SLORB_KEYS.items():
        if key.endswith(new) and key[: -len(new)].endswith((".", "ast_")):
            return key[: -len(new)] + old
    return key


def rewrite_as_version_1(folder: Path) -> None:
    """What hf_sparse 0.1 wrote: slorb.S/X names, format_version 1 in config.json and in every shard's metadata."""
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = {legacy_name(k): v for k, v in load_file(file).items()}
        meta.update({CHECKSUM_KEY: tensor_checksum(iter(tensors.items())), VERSION_KEY: "1"})
        save_file(tensors, file, metadata=meta)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {legacy_name(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = 1
    (folder / "config.json").write_text(json.dumps(config))


def test_exports_are_version_2_with_plain_slorb_names(tmp_path, input_ids):
    assert FORMAT_VERSION == 2
    hf_sparse.export(slorb_model(train_projection=True), tmp_path / "out")
    keys = set(load_file(tmp_path / "out" / "model.safetensors"))
    assert any(k.endswith(".slorb.weight") for k in keys) and any(k.endswith(".slorb.projection") for k in keys)
    assert not any(k.endswith((".slorb.S", ".slorb.X")) for k in keys)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["format_version"] == 2


@pytest.mark.parametrize("bits", [16, 4])
@pytest.mark.parametrize("train_projection", [False, True])
def test_version_1_export_loads_with_the_same_logits(tmp_path, input_ids, bits, train_projection):
    out = tmp_path / "out"
    hf_sparse.export(slorb_model(train_projection), out, bits=bits)
    want = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids).logits
    rewrite_as_version_1(out)
    legacy, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    packed = [m for m in legacy.modules() if isinstance(m, PackedNMLinear)]
    assert packed and all(m.slorb is not None for m in packed)
    assert torch.equal(legacy.eval()(input_ids).logits, want)
    # saved again, it stays a consistent version 1 checkpoint (old names, old version) that loads again
    legacy.save_pretrained(tmp_path / "again")
    keys = set(load_file(tmp_path / "again" / "model.safetensors"))
    assert any(k.endswith(".slorb.S") for k in keys) and not any(k.endswith(".slorb.weight") for k in keys)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["format_version"] == 1
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()(input_ids).logits, want)


def test_version_1_export_is_a_valid_export_source(tmp_path, input_ids):
    """Re-exporting a version 1 folder (its SLoRB read under the old names) writes version 2 with equal logits."""
    hf_sparse.export(slorb_model(False), tmp_path / "v1")
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "v1").eval()(input_ids).logits
    rewrite_as_version_1(tmp_path / "v1")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "v1").dequantize()
    assert any(isinstance(m, SparseLinear) for m in dense.modules())
    assert torch.allclose(dense.eval()(input_ids).logits, want, atol=1e-5)


def test_unknown_format_version_is_refused():
    with pytest.raises(FormatError, match=r"format_version=3 is not supported.*reads versions \[1, 2\]"):
        NMSpec(format_version=3)


def test_hf_sparse_0_1_adapter_with_slorb_S_X_loads(tmp_path, input_ids):
    model = slorb_model(train_projection=True)
    want = model(input_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    renamed = {legacy_name(k): v for k, v in tensors.items()}
    assert any(k.endswith("ast_slorb.S") for k in renamed) and any(k.endswith("ast_slorb.X") for k in renamed)
    save_file(renamed, file, metadata={"format": "pt"})
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")
    assert torch.equal(loaded(input_ids).logits, want)


def test_hf_sparse_0_1_merged_checkpoint_with_slorb_S_loads(tmp_path, input_ids):
    model = slorb_model(train_projection=False)
    merged = model.merge_and_unload()
    want = merged(input_ids).logits
    merged.save_pretrained(tmp_path)
    tensors = {legacy_name(k): v for k, v in load_file(tmp_path / "model.safetensors").items()}
    assert any(k.endswith(".slorb.S") for k in tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert torch.equal(reloaded.eval()(input_ids).logits, want)


def test_old_attribute_names_still_read_with_a_deprecation_warning():
    branch = hf_sparse.modules.SLoRB(32, 8, 16, train_projection=True)
    with pytest.warns(DeprecationWarning, match="SLoRB.S is deprecated"):
        assert branch.S is branch.weight
    with pytest.warns(DeprecationWarning, match="SLoRB.X is deprecated"):
        assert branch.X is branch.projection
