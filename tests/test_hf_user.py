"""What a Hugging Face user does with a loaded export (issue #18): PEFT's own merge, dtype casts, memory reporting,
loading without ``import hf_sparse``."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB
from peft import LoraConfig, PeftModel, get_peft_model
from test_export import ast_model, rel_err
from transformers import AutoModelForCausalLM

import hf_sparse
from hf_sparse.integrations.peft_lora import PackedNMLoraLinear, register_packed_lora
from hf_sparse.modules import PackedNMLinear

Q = "model.layers.0.self_attn.q_proj"
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("hf_user")
    model = ast_model("llama")
    out = {}
    for bits in (16, 4):
        out[bits] = root / f"b{bits}"
        hf_sparse.export(model, out[bits], bits=bits, group_size=32)
    return out


def _trained_lora(model, config: LoraConfig, input_ids: torch.Tensor):
    lora = get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    for _ in range(3):
        lora(input_ids, labels=input_ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return lora.eval()


def _packed(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (m.weight.clone(), m.nm_mask()) for n, m in model.named_modules() if isinstance(m, PackedNMLinear)}


# ---------------- 1. PEFT's own merge_and_unload ----------------


def test_peft_default_merge_on_packed_layers_raises_not_silent(exports, input_ids):
    """Before: merge_and_unload() returned the unchanged packed model (the LoRA silently gone)."""
    loaded = AutoModelForCausalLM.from_pretrained(exports[16])
    lora = _trained_lora(loaded, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), input_ids)
    for merge in (lambda: lora.merge_and_unload(), lambda: lora.merge_and_unload(safe_merge=True), lambda: lora.merge_adapter()):
        with pytest.raises(RuntimeError, match=r"merge_lora_keep_mask.*register_packed_lora"):
            merge()
    with torch.no_grad():
        want = lora(input_ids).logits
    merged = hf_sparse.merge_lora_keep_mask(lora)  # the error's first suggestion still works afterwards
    fresh = AutoModelForCausalLM.from_pretrained(exports[16])
    with torch.no_grad():
        assert rel_err(want, merged(input_ids).logits) < rel_err(want, fresh(input_ids).logits)


@pytest.mark.parametrize("bits", [16, 4])
def test_peft_merge_and_unload_with_registered_layer_keeps_mask(exports, bits, input_ids):
    loaded = AutoModelForCausalLM.from_pretrained(exports[bits])
    before = _packed(loaded)
    lora = _trained_lora(loaded, register_packed_lora(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)), input_ids)
    layer = lora.base_model.model.get_submodule(Q)
    assert isinstance(layer, PackedNMLoraLinear)
    delta = layer.get_delta_weight("default").detach()
    with torch.no_grad():
        lora_logits = lora(input_ids).logits
    merged = lora.merge_and_unload()
    module = merged.get_submodule(Q)
    assert isinstance(module, PackedNMLinear)  # still packed
    w0, mask0 = before[Q]
    assert torch.equal(module.nm_mask(), mask0)
    want = w0 + delta * mask0
    if bits == 16:
        assert torch.allclose(module.weight, want.half().float(), atol=1e-6)
    else:
        assert (module.weight - want).abs().max() <= module.nm_scales.float().max()
    assert hf_sparse.is_nm_sparse(module.weight, 2, 4)
    fresh = AutoModelForCausalLM.from_pretrained(exports[bits])
    with torch.no_grad():  # the LoRA is in the merged weights: closer to the LoRA model than the unmerged base is
        assert rel_err(lora_logits, merged(input_ids).logits) < rel_err(lora_logits, fresh(input_ids).logits)


def test_registered_merge_unmerge_is_exact_and_safe_merge_checks(exports, input_ids, tmp_path):
    loaded = AutoModelForCausalLM.from_pretrained(exports[4])
    lora = _trained_lora(loaded, register_packed_lora(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)), input_ids)
    base = lora.base_model.model.get_submodule(Q).get_base_layer()
    stored = {k: getattr(base, k).clone() for k in ("nm_values", "nm_positions", "nm_scales")}
    with torch.no_grad():
        unmerged = lora(input_ids).logits
    lora.merge_adapter()
    assert not torch.equal(base.nm_values, stored["nm_values"]) or not torch.equal(base.nm_scales, stored["nm_scales"])
    lora.unmerge_adapter()
    for k, t in stored.items():  # exact restore, not W - ΔW re-rounded
        assert torch.equal(getattr(base, k), t), k
    with torch.no_grad():
        assert torch.equal(lora(input_ids).logits, unmerged)
    with torch.no_grad():
        lora.base_model.model.get_submodule(Q).lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        lora.merge_adapter(safe_merge=True)
    for k, t in stored.items():  # nothing was written
        assert torch.equal(getattr(base, k), t), k


def test_registered_layer_through_saved_adapter(exports, input_ids, tmp_path):
    """PEFT does not save the registration: pass the registered config to PeftModel.from_pretrained."""
    loaded = AutoModelForCausalLM.from_pretrained(exports[16])
    lora = _trained_lora(loaded, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), input_ids)
    with torch.no_grad():
        want = lora(input_ids).logits
    lora.save_pretrained(tmp_path / "adapter")
    config = register_packed_lora(LoraConfig.from_pretrained(tmp_path / "adapter"))
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(exports[16]), tmp_path / "adapter", config=config)
    assert isinstance(again.base_model.model.get_submodule(Q), PackedNMLoraLinear)
    with torch.no_grad():
        assert torch.allclose(again(input_ids).logits, want, atol=1e-5)
    merged = again.merge_and_unload()
    assert isinstance(merged.get_submodule(Q), PackedNMLinear)
    with pytest.raises(TypeError, match="register_packed_lora: argument `config`"):
        register_packed_lora({"r": 4})


# ---------------- 6. dtype casts of a loaded export ----------------


@pytest.mark.parametrize("bits", [16, 4])
def test_dtype_cast_keeps_stored_format_and_round_trips(exports, bits, input_ids, tmp_path):
    """Before: .to(bf16) re-rounded fp16 nm_values/nm_scales to bf16 and the re-saved checkpoint failed to load."""
    model = AutoModelForCausalLM.from_pretrained(exports[bits])
    layer = model.get_submodule(Q)
    stored = {k: t.clone() for k, t in layer.named_buffers()}
    model.to(torch.bfloat16)
    for k, t in stored.items():  # the packed tensors are untouched: same dtype, same bits
        assert getattr(layer, k).dtype == t.dtype and torch.equal(getattr(layer, k), t), k
    assert model.get_submodule("model.embed_tokens").weight.dtype == torch.bfloat16  # the rest is cast
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "bf16")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    saved, live = again.state_dict(), model.state_dict()
    assert saved.keys() == live.keys()
    for k, t in live.items():  # bit-identical tensors, packed ones in their stored dtype
        assert saved[k].dtype == t.dtype and torch.equal(saved[k], t), k
    with torch.no_grad():  # (the live model's rotary inv_freq was cast to bf16 too; the reload keeps it fp32)
        assert rel_err(logits.float(), again(input_ids).logits.float()) < 2e-2
    model.to(torch.float32)  # and back: the same weights, fp32 compute
    assert torch.equal(layer.nm_values, stored["nm_values"])
    with pytest.raises(ValueError, match=r"\.half\(\)"):  # transformers refuses .half()/.float() on every quantized model
        model.half()


# ---------------- 7. memory reporting ----------------


def test_memory_footprint_counts_the_kernel_cache(exports, input_ids, tmp_path):
    """Before: get_memory_footprint() ignored the dequantized copies the dense path keeps after the first forward."""
    model = AutoModelForCausalLM.from_pretrained(exports[16])
    packed = [m for m in model.modules() if isinstance(m, PackedNMLinear)]
    before = model.get_memory_footprint()
    with torch.no_grad():
        model(input_ids)
    cached = [t for m in packed for v in m._kernel_cache.values() if isinstance(v, torch.Tensor) for t in [v]]
    assert cached, "the dense path keeps a dequantized copy (HF_SPARSE_DENSE_CACHE unset, CPU kernels off)"
    held = sum(t.numel() * t.element_size() for t in cached)
    assert held >= sum(m.in_features * m.out_features * 2 for m in packed)  # at least a 16-bit dense copy each
    assert model.get_memory_footprint() == before + held
    state = model.state_dict()
    assert not any("kernel_cache" in k for k in state)  # reported, never saved
    model.save_pretrained(tmp_path / "after_forward")
    AutoModelForCausalLM.from_pretrained(tmp_path / "after_forward")
    model.to(torch.float32)  # a move/cast drops the cache (rebuilt at the next forward)
    assert model.get_memory_footprint() == before
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone(input_ids)
    assert clone.get_memory_footprint() == before + held and model.get_memory_footprint() == before



def test_kernel_cache_holds_only_chosen_paths(exports, input_ids, monkeypatch, tmp_path):
    """Before: a CPU kernel that lost the measurement kept its converted weights (unused memory, now also counted)."""
    from hf_sparse.kernels import autotune

    monkeypatch.setenv("HF_SPARSE_CPU_KERNELS", "1")
    monkeypatch.setenv("HF_SPARSE_CACHE_DIR", str(tmp_path / "tune"))  # a fresh autotune cache: every shape measures
    candidates = []

    def dense_wins(fns, rounds):  # a deterministic clock: dense is faster
        candidates.append(set(fns))
        return {name: (fn(), 1.0 if name == "dense" else 2.0)[1] for name, fn in fns.items()}

    monkeypatch.setattr(autotune, "interleaved_min_ms", dense_wins)
    model = AutoModelForCausalLM.from_pretrained(exports[4])
    before = model.get_memory_footprint()
    with torch.no_grad():
        model(input_ids)
    assert any("cpu_int4" in c for c in candidates)  # the int4 kernel ran (built its weights) and lost
    for m in (m for m in model.modules() if isinstance(m, PackedNMLinear)):
        assert set(m._dispatch_memo.values()) == {"dense"}
        assert not any(k.startswith("cpu_int4") for k in m._kernel_cache), list(m._kernel_cache)
    assert model.get_memory_footprint() == before  # dense on CPU beside a CPU kernel re-dequantizes: nothing held

# ---------------- 3. loading without `import hf_sparse` ----------------

_PLAIN_LOAD = """
import sys
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
except ValueError as err:
    print("REFUSED:", err)
else:
    print("LOADED")
assert "hf_sparse" not in sys.modules
"""


def _env() -> dict[str, str]:
    """conftest's HF_SPARSE_*/TRITON settings are in os.environ already; no Hub."""
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def test_plain_transformers_refuses_an_export_naming_hf_sparse(exports, input_ids, tmp_path):
    """Before: "Unknown quantization type ... skip", then a model with random decoder linears and no error."""
    out = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, str(exports[4])], capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "REFUSED:" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "pip install hf-sparse" in out.stdout and "import hf_sparse" in out.stdout
    config = json.loads((exports[4] / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "hf_sparse" and "transformers_weights" in config
    card_intro = (exports[4] / "README.md").read_text().split("| |")[0]  # the card says it before its table
    assert "pip install hf-sparse" in card_intro and "import hf_sparse" in card_intro
    # with hf_sparse (this process) the same directory loads, and the loaded config no longer carries the guard
    model = AutoModelForCausalLM.from_pretrained(exports[4])
    assert isinstance(model.get_submodule(Q), PackedNMLinear)
    assert not hasattr(model.config, "transformers_weights")
    with torch.no_grad():
        assert model(input_ids).logits.shape == (*input_ids.shape, VOCAB)
    # re-saved by transformers: loads with hf_sparse (transformers drops the guard on save, see load_guard.py)
    model.save_pretrained(tmp_path / "resaved")
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "resaved").get_submodule(Q), PackedNMLinear)


# ---------------- small: dequantize() with SLoRB, SparseConv1D re-export ----------------


@pytest.mark.parametrize("arch, slorb", [("llama", True), ("gpt2", True), ("gpt2", False)])
def test_dequantized_model_round_trips(tmp_path, arch, slorb, input_ids):
    """Before: dequantize() left SparseLinear modules unrecorded (save/reload dropped the SLoRB branch silently), and
    gave GPT-2 nn.Linear layers in place of its Conv1D ones (the reload failed on shapes, square ones transposed)."""
    from transformers.pytorch_utils import Conv1D

    from hf_sparse.modules import SparseConv1D, SparseLinear

    assert issubclass(SparseConv1D, SparseLinear)  # re-exported beside SparseLinear
    hf_sparse.export(ast_model(arch, slorb=slorb), tmp_path / "e", bits=4, group_size=32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "e")
    with torch.no_grad():
        want = loaded(input_ids).logits
    dense = loaded.dequantize()
    name = Q if arch == "llama" else "transformer.h.0.attn.c_attn"
    kind = (SparseConv1D if slorb else Conv1D) if arch == "gpt2" else SparseLinear
    assert type(dense.get_submodule(name)) is kind
    if slorb:
        assert dense.config.quantization_config.quant_method == "hf_sparse_slorb"
    with torch.no_grad():
        assert rel_err(want, dense(input_ids).logits) <= 1e-6
    dense.save_pretrained(tmp_path / "dense")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert type(again.get_submodule(name)) is kind
    with torch.no_grad():
        assert rel_err(want, again(input_ids).logits) <= 1e-6
