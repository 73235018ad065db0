"""Loading exports with from_pretrained: validation errors, LoRA on a loaded model, save/reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from test_export import ast_model, rel_err
from transformers import AutoModelForCausalLM

import hf_sparse
from hf_sparse.format import FormatError
from hf_sparse.checksum import tensor_checksum
from hf_sparse.modules import PackedNMLinear

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("load") / "int4"
    hf_sparse.export(ast_model("llama"), out, bits=4, group_size=32)
    return out


def copy_export(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def rewrite_tensors(path: Path, fn) -> None:
    """Re-save model.safetensors after ``fn(tensors)``, with a valid checksum (so only ``fn``'s change matters)."""
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    meta = {"format": "pt", "hf_sparse.sha256": tensor_checksum(iter(tensors.items())), "hf_sparse.format_version": "1"}
    save_file(tensors, str(file), metadata=meta)


def test_loaded_memory_stays_near_file_size(export_dir):
    model = AutoModelForCausalLM.from_pretrained(export_dir)
    in_memory = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    on_disk = (export_dir / "model.safetensors").stat().st_size
    assert in_memory <= on_disk * 1.05
    dense = sum(m.in_features * m.out_features * 4 for m in model.modules() if isinstance(m, PackedNMLinear))
    packed = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, PackedNMLinear) for b in m.buffers())
    assert packed * 5 < dense  # int4 2:4 + scales vs fp32 dense


def test_wrong_format_version(tmp_path, export_dir):
    d = copy_export(export_dir, tmp_path / "v")
    edit_config(d, format_version=99)
    with pytest.raises(FormatError, match="format_version=99 is not supported"):
        AutoModelForCausalLM.from_pretrained(d)
    edit_config(d, format_version=None)
    with pytest.raises(FormatError, match="format_version"):
        AutoModelForCausalLM.from_pretrained(d)


def test_config_mismatch_names_the_tensor(tmp_path, export_dir):
    d = copy_export(export_dir, tmp_path / "bits")
    edit_config(d, bits=8)
    with pytest.raises(FormatError, match=r"nm_values: shape \[\d+, \d+\] does not match"):
        AutoModelForCausalLM.from_pretrained(d)
    d2 = copy_export(export_dir, tmp_path / "sym")
    edit_config(d2, symmetric=False)
    with pytest.raises(FormatError, match="nm_zeros is missing"):
        AutoModelForCausalLM.from_pretrained(d2)
    d3 = copy_export(export_dir, tmp_path / "targets")
    edit_config(d3, targets=["model.layers.0.self_attn.nope"])
    with pytest.raises(FormatError, match="nope"):
        AutoModelForCausalLM.from_pretrained(d3)


def test_missing_and_misshapen_tensors(tmp_path, export_dir):
    d = copy_export(export_dir, tmp_path / "missing")
    rewrite_tensors(d, lambda t: t.pop(f"{Q}.nm_positions"))
    with pytest.raises(FormatError, match=f"{Q}.nm_positions is missing"):
        AutoModelForCausalLM.from_pretrained(d)
    d2 = copy_export(export_dir, tmp_path / "shape")
    rewrite_tensors(d2, lambda t: t.update({f"{Q}.nm_scales": t[f"{Q}.nm_scales"][:, :1].contiguous()}))
    with pytest.raises(FormatError, match=f"{Q}.nm_scales: shape"):
        AutoModelForCausalLM.from_pretrained(d2)
    d3 = copy_export(export_dir, tmp_path / "dtype")
    rewrite_tensors(d3, lambda t: t.update({f"{Q}.nm_scales": t[f"{Q}.nm_scales"].float()}))
    with pytest.raises(FormatError, match=f"{Q}.nm_scales: dtype torch.float32"):
        AutoModelForCausalLM.from_pretrained(d3)


def test_invalid_nm_pattern_is_caught(tmp_path, export_dir):
    d = copy_export(export_dir, tmp_path / "pattern")
    rewrite_tensors(d, lambda t: t[f"{Q}.nm_positions"].fill_(0xFF))  # positions 3,3: not a 2:4 pattern
    with pytest.raises(FormatError, match=f"{Q}.nm_positions does not encode a valid 2:4 pattern"):
        AutoModelForCausalLM.from_pretrained(d)


def test_corruption_is_caught_by_checksum(tmp_path, export_dir):
    d = copy_export(export_dir, tmp_path / "corrupt")
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-100] ^= 0x5A  # flip bits in the tensor data (the header stays valid)
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="checksum mismatch"):
        AutoModelForCausalLM.from_pretrained(d)


def test_truncation_is_caught(tmp_path, export_dir):
    d = copy_export(export_dir, tmp_path / "trunc")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(FormatError, match="truncated or corrupted"):
        AutoModelForCausalLM.from_pretrained(d)


def test_save_pretrained_of_a_loaded_model_reloads(tmp_path, export_dir, input_ids):
    model = AutoModelForCausalLM.from_pretrained(export_dir)
    model.save_pretrained(tmp_path / "resaved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, again(input_ids).logits)


@pytest.mark.parametrize("bits", [16, 4])
def test_lora_on_loaded_model_merges_back_with_mask(tmp_path, bits, input_ids):
    out = tmp_path / "e"
    hf_sparse.export(ast_model("llama"), out, bits=bits, group_size=32)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    before = {n: (m.weight.clone(), m.nm_mask().clone()) for n, m in loaded.named_modules() if isinstance(m, PackedNMLinear)}
    lora = get_peft_model(loaded, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_alpha=8))
    assert lora.print_trainable_parameters() is None
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    for _ in range(5):
        loss = lora(input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    lora.eval()
    name = Q
    lora_layer = lora.base_model.model.get_submodule(name)
    delta = lora_layer.get_delta_weight("default").detach()
    assert delta.abs().sum() > 0
    with torch.no_grad():
        lora_logits = lora(input_ids).logits
    merged = hf_sparse.merge_lora_keep_mask(lora)
    module = merged.get_submodule(name)
    assert isinstance(module, PackedNMLinear)  # still packed, not densified
    w0, mask0 = before[name]
    assert torch.equal(module.nm_mask(), mask0)  # the mask is respected
    want = w0 + delta * mask0
    if bits == 16:
        assert torch.allclose(module.weight, want.half().float(), atol=1e-6)
    else:  # re-rounded to the int4 grid of the merged weights
        step = module.nm_scales.float().max()
        assert (module.weight - want).abs().max() <= step
    with torch.no_grad():  # the merged model computes something new (the LoRA's kept part), not the old model
        assert rel_err(lora_logits, merged(input_ids).logits) < rel_err(lora_logits, AutoModelForCausalLM.from_pretrained(out)(input_ids).logits)


def test_forward_dtype_and_device_move(export_dir, input_ids):
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.bfloat16)
    layer = model.get_submodule(Q)
    assert layer.bias is None and layer.nm_scales.dtype == torch.float16 and layer.nm_values.dtype == torch.uint8
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.dtype == torch.bfloat16 and logits.shape == (*input_ids.shape, VOCAB)


@pytest.mark.parametrize("slorb", [False, True])
def test_dequantize_gives_dense_nm_model(tmp_path, slorb, input_ids):
    hf_sparse.export(ast_model("llama", slorb=slorb), tmp_path / "e", bits=4, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "e")
    with torch.no_grad():
        want = model(input_ids).logits
    dense = model.dequantize()
    assert not any(isinstance(m, PackedNMLinear) for m in dense.modules())
    if slorb:  # the SparseLinear modules are recorded as a merge's are (reload: tests/test_hf_user.py)
        assert dense.config.quantization_config.quant_method == "hf_sparse_slorb"
    else:
        assert not hasattr(dense.config, "quantization_config")
    assert hf_sparse.is_nm_sparse(dense.get_submodule(Q).weight, 2, 4)
    with torch.no_grad():
        assert rel_err(want, dense(input_ids).logits) <= 1e-6


def test_checksum_verification_can_be_skipped(tmp_path, export_dir, monkeypatch):
    d = copy_export(export_dir, tmp_path / "skip")
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-100] ^= 0x01  # a flipped low bit in fp16 embedding data: only the checksum can see it
    (d / "model.safetensors").write_bytes(bytes(raw))
    monkeypatch.setenv("HF_SPARSE_VERIFY_CHECKSUMS", "0")
    AutoModelForCausalLM.from_pretrained(d)  # loads: nothing else is wrong
