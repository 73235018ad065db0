"""AST as a PEFT method: injection, STE, masks, save/load, merge, decay, SLoRB, bad input."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import ARCHS, VOCAB, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import hf_sparse
from hf_sparse import ASTConfig, is_nm_sparse
from hf_sparse.modules import SparseLinear
from hf_sparse.tuners.ast import ASTLayer


def ast_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ASTLayer)]


def assert_all_nm(model, n=2, m=4):
    layers = ast_layers(model)
    assert layers
    for name, layer in layers:
        mask = layer.ast_mask["default"]
        groups = mask.movedim(layer.input_dim, -1).reshape(-1, m).sum(-1)
        assert bool((groups == n).all()), name


@pytest.mark.parametrize("arch", ARCHS)
def test_default_config_targets_decoder_linears_only(arch, input_ids):
    model = get_peft_model(tiny_model(arch), ASTConfig())
    names = [n for n, _ in ast_layers(model)]
    assert all(".layers." in n or ".h." in n for n in names), names
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in names)
    if arch == "gpt2":
        assert any(isinstance(l.get_base_layer(), Conv1D) for _, l in ast_layers(model))
    assert_all_nm(model)
    assert model(input_ids).logits.shape == (*input_ids.shape, VOCAB)
    # every parameter trains by default (the paper), including the dense target weights
    assert all(p.requires_grad for p in model.parameters())


def test_mixtral_experts_dense_only_when_asked_and_logged(caplog):
    """target_parameters=[] keeps the fused experts dense (the default sparsifies them: tests/test_moe.py)."""
    with caplog.at_level("WARNING"):
        model = get_peft_model(tiny_model("mixtral"), ASTConfig(target_parameters=[]))
    names = [n for n, _ in ast_layers(model)]
    assert any("self_attn.q_proj" in n for n in names)
    assert not any("experts" in n or n.endswith(".gate") for n in names)
    assert "experts.gate_up_proj" in caplog.text and "dense" in caplog.text


def test_ste_gradient_equals_effective_weight_gradient(input_ids):
    model = get_peft_model(tiny_model("llama"), ASTConfig())
    name, layer = ast_layers(model)[0]
    captured = {}

    def hook(grad):
        captured["eff"] = grad.clone()

    orig = layer.effective_weight

    def eff(adapter_name=None):
        w = orig(adapter_name)
        w.register_hook(hook)
        return w

    layer.effective_weight = eff
    model(input_ids, labels=input_ids).loss.backward()
    weight_grad = layer.get_base_layer().weight.grad
    assert torch.equal(weight_grad, captured["eff"])
    # pruned weights receive gradient too (they can come back)
    assert weight_grad[~layer.ast_mask["default"]].abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_update_mask_counts_flips_and_stays_nm(arch):
    model = get_peft_model(tiny_model(arch), ASTConfig())
    _, layer = ast_layers(model)[0]
    w = layer.get_base_layer().weight
    assert layer.update_mask().flipped_vs_previous == 0
    with torch.no_grad():
        w.mul_(torch.rand_like(w) * 2)
    upd = layer.update_mask()
    assert upd.flipped_vs_previous > 0 and upd.flipped_vs_initial == upd.flipped_vs_previous
    upd2 = layer.update_mask(score=torch.rand_like(w))
    assert upd2.numel == w.numel() and upd2.flipped_vs_previous > 0
    assert_all_nm(model)
    # flips are counted in pairs: every dropped entry is replaced by a kept one within its group
    assert upd2.flipped_vs_previous % 2 == 0


@pytest.mark.parametrize("use_slorb", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_save_load_identical_logits_and_masks(tmp_path, arch, use_slorb, input_ids):
    model = get_peft_model(tiny_model(arch), ASTConfig(use_slorb=use_slorb))
    # train-like change: perturb weights and recompute masks so they differ from a fresh |W| mask
    with torch.no_grad():
        for _, layer in ast_layers(model):
            layer.get_base_layer().weight.add_(torch.randn_like(layer.get_base_layer().weight) * 0.05)
            layer.update_mask()
            for s in layer.ast_slorb.values():
                s.weight.add_(0.01)
    expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(arch, seed=123), tmp_path)
    assert isinstance(loaded.peft_config["default"], ASTConfig)
    assert torch.equal(loaded(input_ids).logits, expected)
    for (n1, l1), (n2, l2) in zip(ast_layers(model), ast_layers(loaded)):
        assert n1 == n2
        assert torch.equal(l1.ast_mask["default"], l2.ast_mask["default"])
        assert torch.equal(l1.ast_initial_mask["default"], l2.ast_initial_mask["default"])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "mistral", "opt"])
def test_merge_and_unload_exact_nm_and_bit_exact_logits(tmp_path, arch, input_ids):
    model = get_peft_model(tiny_model(arch), ASTConfig())
    expected = model(input_ids).logits
    targets = [n.removeprefix("base_model.model.") for n, _ in ast_layers(model)]
    merged = model.merge_and_unload()
    assert not any(isinstance(m, ASTLayer) for m in merged.modules())
    assert torch.equal(merged(input_ids).logits, expected)
    modules = dict(merged.named_modules())
    for name in targets:
        mod = modules[name]
        dim = 0 if isinstance(mod, Conv1D) else 1
        assert is_nm_sparse(mod.weight, 2, 4, dim=dim), name
        assert int((mod.weight == 0).sum()) >= mod.weight.numel() // 2
    # a plain transformers model: save_pretrained / from_pretrained round trip
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(input_ids).logits, expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_with_slorb_keeps_branch(arch, input_ids):
    model = get_peft_model(tiny_model(arch), ASTConfig(use_slorb=True))
    expected = model(input_ids).logits
    merged = model.merge_and_unload()
    branches = [m for m in merged.modules() if isinstance(m, SparseLinear)]
    assert branches
    torch.testing.assert_close(merged(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
    for b in branches:
        assert is_nm_sparse(b.weight, 2, 4, dim=0 if b.fan_in_fan_out else 1)


def test_slorb_mean_init_and_group_sum():
    model = get_peft_model(tiny_model("llama"), ASTConfig(use_slorb=True, slorb_group_size=16))
    _, layer = ast_layers(model)[0]
    w = layer.get_base_layer().weight.detach()
    mask = layer.ast_mask["default"]
    slorb = layer.ast_slorb["default"]
    assert slorb.projection is None  # fixed projection: no d/k x d matrix is stored
    expected = (w * ~mask).reshape(w.shape[0], -1, 16).mean(-1)
    torch.testing.assert_close(slorb.weight.detach(), expected)
    x = torch.randn(3, w.shape[1])
    X = torch.zeros(w.shape[1] // 16, w.shape[1])
    for j in range(X.shape[0]):
        X[j, j * 16:(j + 1) * 16] = 1
    torch.testing.assert_close(slorb(x), x @ X.t() @ slorb.weight.t())
    # SLoRB at init brings the sparse layer closer to the dense one
    dense_out = x @ w.t()
    err_sparse = (x @ (w * mask).t() - dense_out).norm()
    err_slorb = (x @ (w * mask).t() + slorb(x) - dense_out).norm()
    assert err_slorb < err_sparse


def test_slorb_trainable_projection_and_zero_init():
    model = get_peft_model(
        tiny_model("llama"), ASTConfig(use_slorb=True, slorb_train_projection=True, slorb_init="zero")
    )
    _, layer = ast_layers(model)[0]
    slorb = layer.ast_slorb["default"]
    assert slorb.projection is not None and slorb.projection.requires_grad and slorb.projection.shape == (4, 64)
    assert torch.count_nonzero(slorb.weight) == 0


def test_masked_decay_shrinks_only_pruned_weights():
    model = get_peft_model(tiny_model("llama"), ASTConfig())
    before = {n: l.get_base_layer().weight.detach().clone() for n, l in ast_layers(model)}
    opt = torch.optim.SGD([p for p in model.parameters()], lr=1.0)
    opt.zero_grad()
    model.base_model.apply_masked_decay(0.1)
    opt.step()
    for name, layer in ast_layers(model):
        w = layer.get_base_layer().weight.detach()
        mask = layer.ast_mask["default"]
        assert torch.equal(w[mask], before[name][mask])  # kept: untouched
        assert bool((w[~mask].abs() < before[name][~mask].abs()).all() | (before[name][~mask] == 0).all())
        torch.testing.assert_close(w[~mask], before[name][~mask] * 0.9)


def test_masked_decay_refuses_int_mask():
    from hf_sparse.tuners.ast import masked_decay_term

    with pytest.raises(TypeError, match="bool"):
        masked_decay_term(torch.ones(2, 4), torch.ones(2, 4, dtype=torch.int64), 0.1)


def test_masked_lora_merge_keeps_pattern(input_ids):
    sparse = get_peft_model(tiny_model("llama"), ASTConfig()).merge_and_unload()
    lora = get_peft_model(sparse, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    expected_dense_merge = copy.deepcopy(lora).merge_and_unload()
    merged = hf_sparse.merge_lora_keep_mask(lora)
    for name, mod in merged.named_modules():
        if name.endswith(("q_proj", "down_proj")):
            assert is_nm_sparse(mod.weight, 2, 4), name
            # kept positions moved by exactly the LoRA delta; pruned stayed zero
            dense = dict(expected_dense_merge.named_modules())[name].weight
            nz = mod.weight != 0
            torch.testing.assert_close(mod.weight[nz], dense[nz])
    # PEFT's own merge would have densified the pattern
    assert not is_nm_sparse(dict(expected_dense_merge.named_modules())["model.layers.0.self_attn.q_proj"].weight)


def test_bad_inputs_raise_named_errors():
    with pytest.raises(ValueError, match="`n`"):
        ASTConfig(n=4, m=4)
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(tiny_model("llama"), ASTConfig(target_modules=["does_not_exist"]))
    with pytest.raises(TypeError, match="embed_tokens.*target_modules"):
        get_peft_model(tiny_model("llama"), ASTConfig(target_modules=[r"model\.embed_tokens"]))
    with pytest.raises(ValueError, match=r"q_proj.*in_features=64.*`m`=128"):
        get_peft_model(tiny_model("llama"), ASTConfig(n=2, m=128, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="slorb_group_size"):
        get_peft_model(tiny_model("llama"), ASTConfig(use_slorb=True, slorb_group_size=48, target_modules=["q_proj"]))


def test_include_exclude_patterns_and_trainable_policy():
    config = ASTConfig(
        target_modules=[r".*\.mlp\..*_proj"], exclude_modules=["down_proj"], trainable_non_target="none"
    )
    model = get_peft_model(tiny_model("llama"), config)
    names = [n for n, _ in ast_layers(model)]
    assert names and all(".mlp." in n and "down_proj" not in n for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("base_layer" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)


def test_other_nm_patterns(input_ids):
    model = get_peft_model(tiny_model("qwen2"), ASTConfig(n=1, m=4))
    assert_all_nm(model, 1, 4)
    model = get_peft_model(tiny_model("qwen2"), ASTConfig(n=4, m=8))
    assert_all_nm(model, 4, 8)
    merged = model.merge_and_unload()
    assert is_nm_sparse(merged.model.layers[0].mlp.up_proj.weight, 4, 8)


def test_registered_with_peft():
    assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING["AST"] is ASTConfig
    assert peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING["AST"] == "ast_"
