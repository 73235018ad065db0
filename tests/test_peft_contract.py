"""AST behaves like a PEFT method where PEFT's own generic suite would test it (issue 14).

Part 1: the eight contract breaks found by PEFT 0.21.2's tests/testing_common.py, each on the issue's tiny
``Sequential(Linear(8, 8), ReLU(), Linear(8, 2))``, plus the documented limits (one adapter, disable_adapter).
Part 2: a compact, independent version of testing_common.py's check list (save/load with safetensors and with
low_cpu_mem_usage, is_trainable both ways, set_requires_grad, merge/unmerge/safe_merge/double merge,
modules_to_save, dtype autocast, disable_adapter, generate, merged save/reload) over tiny Llama, GPT-2 (Conv1D),
OPT and Qwen2 models, with and without SLoRB. Real peft objects, real safetensors files, no network.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import VOCAB, tiny_model
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import hf_sparse  # noqa: F401  (registers AST)
from hf_sparse import ASTConfig
from hf_sparse.modules import SparseLinear
from hf_sparse.tuners.ast import ASTLayer

ADAPTER_FILE = "adapter_model.safetensors"
NAN_MSG = "NaNs detected in the merged weights. The adapter default seems to be broken"


# ---------------------------------------------------------------- part 1: the tiny model, one test per break
def seq(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).to(dtype)


def seq_config(**kwargs) -> ASTConfig:
    kwargs.setdefault("use_slorb", True)
    return ASTConfig(target_modules=["2"], slorb_group_size=4, **kwargs)


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def train_like(model: nn.Module) -> None:
    """What a few training steps do: every trained tensor moves, masks are recomputed."""
    for name, p in model.named_parameters():
        if p.is_floating_point():
            p.add_(torch.randn_like(p) * 0.05)
    for module in model.modules():
        if isinstance(module, ASTLayer):
            module.update_mask()


def test_1_inference_load_is_frozen_and_saves_the_same_adapter(tmp_path):
    model = get_peft_model(seq(), seq_config())
    train_like(model)
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(seq(seed=1), tmp_path / "a")  # is_trainable=False: inference_mode
    assert trainable(loaded) == set()
    loaded.save_pretrained(tmp_path / "b")  # frozen, yet the trained non-target weights (0.*) are still saved
    first, second = load_file(tmp_path / "a" / ADAPTER_FILE), load_file(tmp_path / "b" / ADAPTER_FILE)
    assert "base_model.model.0.weight" in second
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    again = PeftModel.from_pretrained(seq(seed=2), tmp_path / "a", is_trainable=True)
    assert trainable(again) == trainable(model)


def test_2_set_requires_grad_toggles_everything_ast_trains():
    model = get_peft_model(seq(), seq_config())
    before = trainable(model)
    assert "base_model.model.2.base_layer.weight" in before and "base_model.model.0.weight" in before
    model.set_requires_grad("default", False)
    assert trainable(model) == set()
    model.set_requires_grad("default", True)
    assert trainable(model) == before
    model.base_model.set_adapter("default", inference_mode=True)
    assert trainable(model) == set()


def test_3_slorb_with_low_cpu_mem_usage(tmp_path):
    model = get_peft_model(seq(), seq_config())
    train_like(model)
    model.save_pretrained(tmp_path)
    x = torch.randn(3, 8)
    loaded = PeftModel.from_pretrained(seq(seed=1), tmp_path, low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert torch.equal(loaded(x), model(x))
    injected = inject_adapter_in_model(seq_config(), seq(), low_cpu_mem_usage=True)
    assert "meta" in {p.device.type for p in injected.parameters()}  # the branch waits for its weights


def test_4_slorb_follows_autocast_adapter_dtype():
    kept = get_peft_model(seq(torch.bfloat16), seq_config(), autocast_adapter_dtype=False)
    assert {p.dtype for n, p in kept.named_parameters() if "ast_slorb" in n} == {torch.bfloat16}
    upcast = get_peft_model(seq(torch.bfloat16), seq_config())
    assert {p.dtype for n, p in upcast.named_parameters() if "ast_slorb" in n} == {torch.float32}
    assert kept(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("where", ["slorb", "weight"])
def test_5_safe_merge_checks_the_slorb_branch(where):
    model = get_peft_model(seq(), seq_config())
    layer = model.base_model.model[2]
    with torch.no_grad():
        if where == "slorb":
            layer.ast_slorb["default"].weight[0, 0] = float("nan")
        else:
            layer.get_base_layer().weight[layer.ast_mask["default"]] = float("inf")
    before = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match=NAN_MSG) as err:
        model.merge_and_unload(safe_merge=True)
    assert str(err.value).startswith("2: ") and (where != "slorb" or "SLoRB weight" in str(err.value))
    assert torch.equal(layer.get_base_layer().weight, before)  # nothing written


def test_6_merging_twice_warns_and_changes_nothing():
    model = get_peft_model(seq(), seq_config())
    x = torch.randn(3, 8)
    model.merge_adapter()
    merged = model(x)
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    assert torch.equal(model(x), merged)
    model.unmerge_adapter()
    with pytest.warns(UserWarning, match="Already unmerged. Nothing to do"):
        model.unmerge_adapter()


def test_7_modules_to_save_saved_once_and_loaded_without_unexpected_keys(tmp_path):
    model = get_peft_model(seq(), seq_config(modules_to_save=["0"]))
    train_like(model)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / ADAPTER_FILE))
    assert not any("modules_to_save" in k or "original_module" in k for k in keys), keys
    assert {"base_model.model.0.weight", "base_model.model.0.bias"} <= keys
    fresh = get_peft_model(seq(seed=1), seq_config(modules_to_save=["0"]))
    result = set_peft_model_state_dict(fresh, load_peft_weights(str(tmp_path)))
    assert result.unexpected_keys == []
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_8_merged_slorb_model_round_trips_through_transformers(tmp_path, arch, input_ids):
    from hf_sparse.modules.sparse_linear import SparseConv1D

    model = get_peft_model(tiny_model(arch), ASTConfig(use_slorb=True))
    train_like(model)
    want = model(input_ids).logits
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path)
    entry = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert entry["quant_method"] == "hf_sparse_slorb"
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    branches = [m for m in reloaded.modules() if isinstance(m, SparseLinear)]
    assert len(branches) == len([m for m in merged.modules() if isinstance(m, SparseLinear)])
    assert all(isinstance(m, SparseConv1D) == (arch == "gpt2") for m in branches)
    assert not getattr(reloaded, "is_quantized", False)  # a plain model: .half(), Trainer... as usual
    assert torch.equal(reloaded.eval()(input_ids).logits, want)
    reloaded.save_pretrained(tmp_path / "again")  # the entry is kept: a second round trip too
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()(input_ids).logits, want)


def test_8_merged_checkpoint_missing_a_branch_tensor_is_refused(tmp_path):
    merged = get_peft_model(tiny_model("llama"), ASTConfig(use_slorb=True)).merge_and_unload()
    merged.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    victim = next(k for k in tensors if k.endswith(".slorb.weight"))
    del tensors[victim]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{victim.replace('.', '[.]')} is missing from the checkpoint"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_ast_cannot_be_applied_to_a_merged_conv1d_branch():
    merged = get_peft_model(tiny_model("gpt2"), ASTConfig(use_slorb=True)).merge_and_unload()
    with pytest.raises(TypeError, match=r"transformer\.h\.0\.attn\.c_attn: .*merged AST layer"):
        get_peft_model(merged, ASTConfig())


def test_documented_limits_one_adapter_and_disable_adapter_gives_trained_dense():
    original = seq()
    model = get_peft_model(copy.deepcopy(original), seq_config())
    with pytest.raises(ValueError, match="one AST adapter"):
        model.add_adapter("other", seq_config())
    train_like(model)
    x = torch.randn(3, 8)
    dense_trained = copy.deepcopy(model).unload()  # the trained dense weights, no mask
    with model.disable_adapter():
        off = model(x)
    assert torch.equal(off, dense_trained(x))
    assert not torch.allclose(off, original(x))  # not the original model: keep a copy of it for that


# ---------------------------------------------------------------- part 2: the generic checks over real architectures
ARCH_CASES = [(a, s) for a in ("llama", "gpt2", "opt", "qwen2") for s in (False, True)]
IDS = [f"{a}-{'slorb' if s else 'plain'}" for a, s in ARCH_CASES]
FINAL_NORM = {
    "llama": "model.norm", "qwen2": "model.norm", "opt": "model.decoder.final_layer_norm", "gpt2": "transformer.ln_f",
}


def ast_model(arch: str, slorb: bool, trained: bool = True, **kwargs) -> PeftModel:
    model = get_peft_model(tiny_model(arch), ASTConfig(use_slorb=slorb, **kwargs))
    if trained:
        train_like(model)
    return model.eval()


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch,slorb", ARCH_CASES, ids=IDS)
def test_save_load_safetensors(tmp_path, arch, slorb, input_ids):
    model = ast_model(arch, slorb)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {ADAPTER_FILE, "adapter_config.json"} <= files and not files & {"model.safetensors", "config.json"}
    with warnings.catch_warnings(record=True) as recs:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny_model(arch, seed=123), tmp_path)
    assert not any("missing adapter keys" in str(r.message) for r in recs)
    want, got = full_state(model), full_state(loaded)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)
    save_file(get_peft_model_state_dict(model), tmp_path / "adapter_only.safetensors")  # contiguous (Conv1D masks)
    save_file({k: v for k, v in model.state_dict().items() if "lm_head" not in k}, tmp_path / "full.safetensors")


@pytest.mark.parametrize("arch,slorb", ARCH_CASES, ids=IDS)
def test_load_low_cpu_mem_usage(tmp_path, arch, slorb, input_ids):
    model = ast_model(arch, slorb)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(arch, seed=123), tmp_path, low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)
    injected = inject_adapter_in_model(ASTConfig(use_slorb=slorb), tiny_model(arch), low_cpu_mem_usage=True)
    assert any(isinstance(m, ASTLayer) for m in injected.modules())
    assert ("meta" in {p.device.type for p in injected.parameters()}) == slorb


@pytest.mark.parametrize("arch,slorb", ARCH_CASES, ids=IDS)
def test_is_trainable_both_ways_and_set_requires_grad(tmp_path, arch, slorb):
    model = ast_model(arch, slorb)
    expected = trainable(model)
    assert any("base_layer.weight" in n for n in expected) and any("embed" in n or "wte" in n for n in expected)
    assert slorb == any("ast_slorb" in n for n in expected)
    model.save_pretrained(tmp_path / "a")
    frozen = PeftModel.from_pretrained(tiny_model(arch, seed=1), tmp_path / "a")
    assert trainable(frozen) == set()
    frozen.save_pretrained(tmp_path / "b")
    assert load_file(tmp_path / "a" / ADAPTER_FILE).keys() == load_file(tmp_path / "b" / ADAPTER_FILE).keys()
    live = PeftModel.from_pretrained(tiny_model(arch, seed=1), tmp_path / "a", is_trainable=True)
    assert trainable(live) == expected
    live.set_requires_grad("default", False)
    assert trainable(live) == set()
    live.set_requires_grad("default", True)
    assert trainable(live) == expected


@pytest.mark.parametrize("arch,slorb", ARCH_CASES, ids=IDS)
def test_merge_unmerge_double_merge_safe_merge(arch, slorb, input_ids):
    model = ast_model(arch, slorb)
    sparse = model(input_ids).logits
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids).logits, sparse, atol=1e-6, rtol=1e-6)
    with pytest.warns(UserWarning, match="All adapters are already merged"):
        model.merge_adapter()
    model.unmerge_adapter()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # bit-exact restore
    assert torch.equal(model(input_ids).logits, sparse)
    merged = copy.deepcopy(model).merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, ASTLayer) for m in merged.modules())
    assert slorb == any(isinstance(m, SparseLinear) for m in merged.modules())
    torch.testing.assert_close(merged(input_ids).logits, sparse, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        layer = next(m for m in model.modules() if isinstance(m, ASTLayer))
        if slorb:
            layer.ast_slorb["default"].weight[0, 0] = float("nan")
        else:  # at kept positions: what the merge writes
            layer.get_base_layer().weight[layer.ast_mask["default"]] = float("nan")
    with pytest.raises(ValueError, match=NAN_MSG):
        model.merge_and_unload(safe_merge=True)


@pytest.mark.parametrize("arch,slorb", ARCH_CASES, ids=IDS)
def test_modules_to_save(tmp_path, arch, slorb, input_ids):
    norm = FINAL_NORM[arch]
    model = ast_model(arch, slorb, modules_to_save=[norm])
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / ADAPTER_FILE))
    assert f"base_model.model.{norm}.weight" in keys
    assert not any("modules_to_save" in k or "original_module" in k for k in keys)
    fresh = get_peft_model(tiny_model(arch, seed=123), ASTConfig(use_slorb=slorb, modules_to_save=[norm]))
    result = set_peft_model_state_dict(fresh, load_peft_weights(str(tmp_path)))
    assert result.unexpected_keys == []
    assert torch.equal(fresh.eval()(input_ids).logits, model(input_ids).logits)


@pytest.mark.parametrize("arch,slorb", ARCH_CASES, ids=IDS)
def test_dtype_autocast(arch, slorb, input_ids):
    for autocast, slorb_dtype in ((False, torch.bfloat16), (True, torch.float32)):
        model = get_peft_model(tiny_model(arch).to(torch.bfloat16), ASTConfig(use_slorb=slorb),
                               autocast_adapter_dtype=autocast)
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        assert {d for n, d in dtypes.items() if "ast_slorb" not in n} == {torch.bfloat16}
        assert {d for n, d in dtypes.items() if "ast_slorb" in n} == ({slorb_dtype} if slorb else set())
        assert torch.isfinite(model(input_ids).logits).all()
    merged = model.merge_and_unload()  # half precision merges too
    assert torch.isfinite(merged(input_ids).logits).all()


@pytest.mark.parametrize("arch,slorb", ARCH_CASES, ids=IDS)
def test_disable_adapter_gives_the_trained_dense_model(arch, slorb, input_ids):
    model = ast_model(arch, slorb)
    sparse = model(input_ids).logits
    dense = copy.deepcopy(model).unload()
    with model.disable_adapter():
        off = model(input_ids).logits
    assert torch.equal(off, dense(input_ids).logits)
    assert not torch.allclose(off, sparse)
    assert torch.equal(model(input_ids).logits, sparse)


@pytest.mark.parametrize("arch,slorb", ARCH_CASES, ids=IDS)
def test_generate_and_merged_reload(tmp_path, arch, slorb, input_ids):
    model = ast_model(arch, slorb)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids=input_ids, **kwargs)
    assert out.shape == (input_ids.shape[0], input_ids.shape[1] + 4) and int(out.max()) < VOCAB
    out_pos = model.generate(input_ids, **kwargs)  # positional input_ids, as in PEFT's generate_pos_args
    assert torch.equal(out, out_pos)
    merged = model.merge_and_unload()
    assert torch.equal(merged.generate(input_ids=input_ids, **kwargs), out)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded.generate(input_ids=input_ids, **kwargs), out)
