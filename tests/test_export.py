"""Export: packing math, round trips through from_pretrained, GPTQ, input kinds, atomic writes."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model
from peft import get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_sparse
from hf_sparse import ASTConfig, is_nm_sparse
from hf_sparse.format import FORMAT_VERSION, NMSpec, unpack_weight
from hf_sparse.quantization import pack_gptq, pack_rtn
from hf_sparse.modules import PackedNMLinear
from hf_sparse.sparsity import nm_mask
from hf_sparse.tuners.ast import ASTLayer


def ast_model(arch: str, slorb: bool = False, seed: int = 0, **kw):
    model = get_peft_model(tiny_model(arch, seed=seed), ASTConfig(use_slorb=slorb, slorb_group_size=16, **kw))
    if slorb:  # make the branch clearly non-zero so a dropped SLoRB would show in the logits
        with torch.no_grad():
            for _, layer in model.named_modules():
                if isinstance(layer, ASTLayer):
                    for s in layer.ast_slorb.values():
                        s.weight.add_(0.05 * torch.randn_like(s.weight))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def tree_digest(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------- packing math ----------------


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 128, None])
def test_pack_unpack_keeps_mask_and_bounds_error(bits, symmetric, group_size):
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    mask = nm_mask(w.abs(), 2, 4)
    spec = NMSpec(bits=bits, symmetric=symmetric, group_size=group_size)
    packed = pack_rtn(w, mask, spec)
    dense = packed.dense(spec)
    assert dense.shape == w.shape
    assert not dense[~mask].any()  # pruned weights are exactly zero
    assert is_nm_sparse(dense, 2, 4)
    kept = spec.kept(256)
    assert packed.values.shape == ((48, kept) if bits != 4 else (48, kept // 2))
    assert packed.positions.shape == (48, kept * 2 // 8) and packed.positions.dtype == torch.uint8
    if bits < 16:
        groups = 1 if group_size is None else 256 // group_size
        assert packed.scales.shape == (48, groups)
        assert (packed.zeros is None) == symmetric
        # RTN error: half a step (symmetric); asymmetric adds up to half a step from the integer zero-point
        step = packed.scales.float().repeat_interleave(kept // groups, 1)
        kept_err = (dense[mask].reshape(48, -1) - w[mask].reshape(48, -1)).abs()
        assert bool((kept_err <= step * (0.5 if symmetric else 1.0) + 1e-6).all())
    else:
        assert torch.equal(dense[mask], w[mask].half().float())


def test_int4_low_nibble_is_even_index_and_symmetric_zero_is_implicit():
    spec = NMSpec(bits=4, group_size=None)
    w = torch.tensor([[1.0, 0.0, -1.0, 0.0, 0.5, 0.0, 0.0, -0.5]])  # kept: 1, -1, 0.5, -0.5
    mask = w != 0
    packed = pack_rtn(w, mask, spec)
    codes = [int(b) & 0xF for b in packed.values[0]] + [int(b) >> 4 for b in packed.values[0]]
    even, odd = codes[:2], codes[2:]
    # scale = 1/7, zero = 8: 1 -> 15, -1 -> 1, 0.5 -> round(3.5)+8 = 12 (half to even: 4 -> 12), -0.5 -> 4
    assert even == [15, 12 if round(3.5) == 4 else 11] and odd[0] == 1
    assert torch.allclose(packed.dense(spec), w, atol=1 / 14 + 1e-3)


def test_gptq_respects_mask_and_beats_rtn_on_its_calibration_data():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    mask = nm_mask(w.abs(), 2, 4)
    x = torch.randn(2048, 256) @ torch.randn(256, 256) * 0.1  # correlated inputs, where GPTQ helps
    H = x.t() @ x / x.shape[0]
    spec = NMSpec(bits=4, group_size=64)
    g = pack_gptq(w, mask, H, spec).dense(spec)
    r = pack_rtn(w, mask, spec).dense(spec)
    assert not g[~mask].any() and is_nm_sparse(g, 2, 4)
    target = x @ (w * mask).t()
    assert ((x @ g.t() - target) ** 2).mean() < 0.9 * ((x @ r.t() - target) ** 2).mean()


# ---------------- round trips through from_pretrained ----------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("slorb", [False, True])
def test_roundtrip_logits_equal_fake_quantized(tmp_path, arch, bits, slorb, input_ids):
    model = ast_model(arch, slorb)
    out = tmp_path / "export"
    hf_sparse.export(model, out, bits=bits, group_size=32)
    reference = hf_sparse.fake_quantize(copy.deepcopy(model), bits=bits, group_size=32)
    loaded = AutoModelForCausalLM.from_pretrained(out)

    targets = loaded.config.quantization_config.targets
    assert len(targets) == len([m for m in model.modules() if isinstance(m, ASTLayer)])
    assert all(isinstance(loaded.get_submodule(t), PackedNMLinear) for t in targets)
    assert not any(k.endswith(f"{targets[0]}.weight") for k in loaded.state_dict())  # no dense weight stored
    with torch.no_grad():
        ref, got = reference(input_ids).logits, loaded(input_ids).logits
        dense = model.get_base_model()(input_ids).logits
    assert got.shape == (*input_ids.shape, VOCAB)
    assert rel_err(ref, got) <= 1e-5
    if bits < 16:
        assert rel_err(dense, got) > 1e-4  # quantization really happened (the check above is not vacuous)
    # the loaded layers keep the AST masks exactly
    first = model.get_base_model().get_submodule(targets[0])
    mask = first.ast_mask["default"]
    mask = mask.t() if first.fan_in_fan_out else mask
    assert torch.equal(loaded.get_submodule(targets[0]).nm_mask(), mask)


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, None, False), (8, 64, False), (4, 128, True)])
def test_roundtrip_asymmetric_and_per_channel(tmp_path, bits, group_size, symmetric, input_ids):
    model = ast_model("llama")
    hf_sparse.export(model, tmp_path / "e", bits=bits, group_size=group_size if group_size != 128 else 64, symmetric=symmetric)
    ref = hf_sparse.fake_quantize(copy.deepcopy(model), bits=bits, group_size=group_size if group_size != 128 else 64, symmetric=symmetric)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "e")
    with torch.no_grad():
        assert rel_err(ref(input_ids).logits, loaded(input_ids).logits) <= 1e-5
    qc = json.loads((tmp_path / "e" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "hf_sparse" and qc["format_version"] == FORMAT_VERSION
    assert qc["n"] == 2 and qc["m"] == 4 and qc["bits"] == bits and qc["symmetric"] == symmetric


def test_roundtrip_gptq_equals_fake_quantized_gptq(tmp_path, input_ids):
    model = ast_model("llama")
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(3))
    hf_sparse.export(model, tmp_path / "g", bits=4, group_size=32, method="gptq", calibration_data=calib)
    ref = hf_sparse.fake_quantize(copy.deepcopy(model), bits=4, group_size=32, method="gptq", calibration_data=calib)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    with torch.no_grad():
        assert rel_err(ref(input_ids).logits, loaded(input_ids).logits) <= 1e-5
    with pytest.raises(ValueError, match="calibration_data"):
        hf_sparse.export(model, tmp_path / "g2", bits=4, group_size=32, method="gptq")


def test_export_from_merged_model_and_checkpoint_dir(tmp_path, input_ids):
    model = ast_model("gpt2", slorb=True)
    ref = hf_sparse.fake_quantize(copy.deepcopy(model), bits=8, group_size=64)
    merged = copy.deepcopy(model).merge_and_unload()  # SparseLinear modules carrying SLoRB
    hf_sparse.export(merged, tmp_path / "from_merged", bits=8, group_size=64)
    merged.save_pretrained(tmp_path / "merged_ckpt")
    hf_sparse.export(tmp_path / "merged_ckpt", tmp_path / "from_dir", bits=8, group_size=64)
    with torch.no_grad():
        want = ref(input_ids).logits
        for name in ("from_merged", "from_dir"):
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / name)
            assert rel_err(want, loaded(input_ids).logits) <= 1e-5, name


def test_export_from_adapter_dir(tmp_path, input_ids):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), ASTConfig())
    model.save_pretrained(tmp_path / "adapter")
    hf_sparse.export(tmp_path / "adapter", tmp_path / "e", bits=4, group_size=32)
    ref = hf_sparse.fake_quantize(copy.deepcopy(model), bits=4, group_size=32)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "e")(input_ids).logits
        assert rel_err(ref(input_ids).logits, got) <= 1e-5


def test_export_leaves_the_peft_model_untouched(tmp_path, input_ids):
    model = ast_model("llama", slorb=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hf_sparse.export(model, tmp_path / "e", bits=4, group_size=32)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_dense_model_is_refused_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no 2:4 sparse linear"):
        hf_sparse.export(tiny_model("llama"), tmp_path / "e")
    with pytest.raises(ValueError, match="q_proj.*not 2:4 sparse"):
        hf_sparse.export(tiny_model("llama"), tmp_path / "e", targets=[r"model\.layers\.0\.self_attn\.q_proj"])
    assert not (tmp_path / "e").exists()
    with pytest.raises(ValueError, match="bits"):
        hf_sparse.export(ast_model("llama"), tmp_path / "e", bits=3)
    with pytest.raises(ValueError, match="group_size"):
        hf_sparse.export(ast_model("llama"), tmp_path / "e", bits=4, group_size=6)


# ---------------- atomic writes ----------------


def test_failed_export_leaves_no_partial_dir_and_keeps_earlier_export(tmp_path, input_ids, monkeypatch):
    import importlib

    api = importlib.import_module("hf_sparse.exporters.api")
    model = ast_model("llama")
    out = tmp_path / "export"
    hf_sparse.export(model, out, bits=4, group_size=32)
    digest = tree_digest(out)
    # a second export dies after writing two of its shards
    real_write_shards = api.write_shards
    monkeypatch.setattr(api, "write_shards", lambda *a, **kw: real_write_shards(*a, **kw, fail_after=2))
    with pytest.raises(RuntimeError, match="aborted"):
        hf_sparse.export(model, out, bits=8, group_size=32, max_shard_size=20_000)
    monkeypatch.setattr(api, "write_shards", real_write_shards)
    assert tree_digest(out) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp dir left behind
    # a failing tensor in a fresh location: nothing appears at all
    bad = ast_model("llama")
    layer = next(m for m in bad.modules() if isinstance(m, ASTLayer))
    layer.ast_mask["default"][0, :4] = True  # 4 of 4 kept: not 2:4 any more
    with pytest.raises(ValueError, match="2:4"):
        hf_sparse.export(bad, tmp_path / "fresh", bits=4, group_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    loaded = AutoModelForCausalLM.from_pretrained(out)  # the earlier export still loads
    assert loaded.config.quantization_config.bits == 4
    # a successful export replaces it whole (no stale files from the old one, no leftovers beside it)
    hf_sparse.export(model, out, bits=8, group_size=32, max_shard_size=20_000)
    assert AutoModelForCausalLM.from_pretrained(out).config.quantization_config.bits == 8
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_sharded_export_loads(tmp_path, input_ids):
    model = ast_model("llama")
    hf_sparse.export(model, tmp_path / "s", bits=4, group_size=32, max_shard_size=20_000)
    shards = sorted(p.name for p in (tmp_path / "s").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "s" / "model.safetensors.index.json").exists()
    ref = hf_sparse.fake_quantize(copy.deepcopy(model), bits=4, group_size=32)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "s")(input_ids).logits
        assert rel_err(ref(input_ids).logits, got) <= 1e-5
    with safe_open(str(tmp_path / "s" / shards[0]), framework="pt") as f:
        assert f.metadata()["hf_sparse.format_version"] == str(FORMAT_VERSION)


def test_unpack_weight_matches_module_weight(tmp_path):
    model = ast_model("llama")
    hf_sparse.export(model, tmp_path / "e", bits=4, group_size=32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "e")
    mod = loaded.model.layers[0].mlp.down_proj
    w = unpack_weight(mod.nm_values, mod.nm_positions, mod.nm_scales, None, mod.spec)
    assert torch.equal(w, mod.weight) and is_nm_sparse(w, 2, 4)


def test_ragged_last_group_round_trip(tmp_path, input_ids):
    """in_features not a multiple of group_size (SmolLM2: 576 = 4x128 + 64): the last group is shorter."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=96, num_attention_heads=4, num_hidden_layers=1,
                                   intermediate_size=160, num_key_value_heads=2)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg).eval(), ASTConfig())
    hf_sparse.export(model, tmp_path / "r", bits=4, group_size=64, symmetric=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "r")
    assert loaded.model.layers[0].self_attn.q_proj.nm_scales.shape == (96, 2)  # ceil(96 / 64)
    assert loaded.model.layers[0].mlp.down_proj.nm_scales.shape == (96, 3)  # ceil(160 / 64)
    ref = hf_sparse.fake_quantize(copy.deepcopy(model), bits=4, group_size=64, symmetric=False)
    with torch.no_grad():
        assert rel_err(ref(input_ids).logits, loaded(input_ids).logits) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_roundtrip_slorb_with_trained_projection(tmp_path, arch, input_ids):
    model = ast_model(arch, slorb=True, slorb_train_projection=True)
    with torch.no_grad():  # a trained X differs from the 0/1 group sums
        for m in model.modules():
            if isinstance(m, ASTLayer):
                for s in m.ast_slorb.values():
                    s.projection.add_(0.01 * torch.randn_like(s.projection))
    hf_sparse.export(model, tmp_path / "x", bits=4, group_size=32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "x")
    assert loaded.config.quantization_config.slorb == {"group_size": 16, "train_projection": True}
    ref = hf_sparse.fake_quantize(copy.deepcopy(model), bits=4, group_size=32)
    with torch.no_grad():
        assert rel_err(ref(input_ids).logits, loaded(input_ids).logits) <= 1e-5


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "opt", "mixtral"])
def test_roundtrip_other_architectures(tmp_path, arch, input_ids):
    model = ast_model(arch)
    hf_sparse.export(model, tmp_path / arch, bits=4, group_size=32)
    ref = hf_sparse.fake_quantize(copy.deepcopy(model), bits=4, group_size=32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / arch)
    with torch.no_grad():
        assert rel_err(ref(input_ids).logits, loaded(input_ids).logits) <= 1e-5
    out = loaded.generate(input_ids[:, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (input_ids.shape[0], 7)
