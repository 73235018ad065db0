"""MoE: AST on transformers 5's fused 3-D expert parameters (PEFT's target_parameters / ParamWrapper convention).

Tiny real configs of Mixtral, Qwen2-MoE (shared expert), Qwen3-MoE, OLMoE, DeepSeek-V3 (shared experts, a dense
first layer) and gpt-oss (the transposed [E, in, out] layout, expert biases).
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from conftest import VOCAB
from peft import PeftModel, get_peft_model
from test_training_utils import ast_args, hamlet_blocks
from transformers import TrainerCallback, default_data_collator

from hf_sparse import ASTConfig, ASTTrainer, is_nm_sparse
from hf_sparse.tuners.ast.experts import ParamWrapper
from hf_sparse.tuners.ast.layer import ASTLayer
from hf_sparse.training.callbacks import find_ast_model
from hf_sparse.training.optim import MaskedDecayAdamW

MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
IMPLEMENTATIONS = ["eager", "batched_mm", "grouped_mm"]


def moe_config(arch: str, experts: int = 8):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=2)
    if arch == "mixtral":
        return transformers.MixtralConfig(intermediate_size=128, num_local_experts=experts, num_experts_per_tok=2,
                                          **common)
    if arch == "qwen2_moe":
        return transformers.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=64, num_experts=experts,
                                           shared_expert_intermediate_size=128, num_experts_per_tok=2, **common)
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=64, num_experts=experts,
                                           num_experts_per_tok=2, head_dim=16, **common)
    if arch == "olmoe":
        return transformers.OlmoeConfig(intermediate_size=64, num_experts=experts, num_experts_per_tok=2,
                                        eos_token_id=None, **common)
    if arch == "deepseek_v3":
        common["num_key_value_heads"] = 4
        return transformers.DeepseekV3Config(
            intermediate_size=128, moe_intermediate_size=64, n_routed_experts=experts, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=32,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **common)
    if arch == "gpt_oss":
        return transformers.GptOssConfig(intermediate_size=64, num_local_experts=experts, num_experts_per_tok=2,
                                         head_dim=16, sliding_window=8,
                                         layer_types=["sliding_attention", "full_attention"], **common)
    raise KeyError(arch)


def moe_model(arch: str, seed: int = 0, experts: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(moe_config(arch, experts))
    return model.eval()


def expert_wrappers(model) -> list[tuple[str, ParamWrapper]]:
    ast_model, _ = find_ast_model(model)
    return ast_model.ast_expert_layers()


def expert_params(model) -> list[tuple[str, torch.nn.Parameter, int]]:
    """(name, fused expert parameter, its input dim) of a plain transformers model."""
    out = []
    for name, module in model.named_modules():
        for pname in ("gate_up_proj", "down_proj"):
            param = getattr(module, pname, None)
            if isinstance(param, torch.nn.Parameter) and param.dim() == 3:
                out.append((f"{name}.{pname}", param, 1 if module.is_transposed else 2))
    return out


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_default_config_targets_experts_and_keeps_routers_dense(arch, caplog):
    base = moe_model(arch)
    decoder_weights = {
        n: p.numel() for n, p in base.named_parameters()
        if ".layers." in n and p.dim() >= 2 and not n.endswith("bias")
    }
    with caplog.at_level(logging.INFO, logger="hf_sparse.tuners.ast.model"):
        model = get_peft_model(base, ASTConfig())
    ast_model, _ = find_ast_model(model)
    wrappers = ast_model.ast_expert_layers()
    assert {n.rsplit(".", 1)[-1] for n, _ in wrappers} == {"gate_up_proj", "down_proj"}
    assert len(wrappers) == 2 * sum(1 for n, _ in base.named_modules() if n.endswith("mlp.experts"))
    targeted = sum(w.get_param().numel() for _, w in wrappers)
    targeted += sum(l.get_base_layer().weight.numel() for _, l in ast_model.ast_layers())
    assert targeted / sum(decoder_weights.values()) >= 0.95
    names = [n for n, _ in ast_model.ast_layers()]
    assert not any(n.endswith((".gate", ".router", "shared_expert_gate")) for n in names)  # routers stay dense
    if arch in ("qwen2_moe", "deepseek_v3"):  # shared experts are plain MLPs: their Linears are targets
        assert any("shared_expert" in n for n in names)
    assert "of the decoder-block weight parameters" in caplog.text


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_adapter_and_merged_logits_agree_and_experts_exactly_nm(arch, ids):
    model = get_peft_model(moe_model(arch), ASTConfig())
    with torch.no_grad():
        adapter = model(ids).logits
        with model.disable_adapter():
            dense = model(ids).logits
    assert not torch.allclose(adapter, dense, atol=1e-4)  # the masks act on the experts' forward
    merged = model.merge_and_unload()
    assert not any(isinstance(m, (ParamWrapper, ASTLayer)) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter, rtol=1e-5, atol=1e-6)
    params = expert_params(merged)
    assert params
    for name, param, dim in params:
        assert is_nm_sparse(param, 2, 4, dim=dim), name
        assert int((param != 0).sum()) * 2 <= param.numel(), name
    if arch == "gpt_oss":
        assert {d for _, _, d in params} == {1}


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_experts_implementations_give_the_same_logits(arch, ids):
    model = get_peft_model(moe_model(arch), ASTConfig())
    logits = {}
    for impl in IMPLEMENTATIONS:
        model.base_model.model.set_experts_implementation(impl)
        with torch.no_grad():
            logits[impl] = model(ids).logits
    for impl in IMPLEMENTATIONS[1:]:
        torch.testing.assert_close(logits[impl], logits["eager"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_ste_gradient_reaches_the_dense_expert_weight(impl, ids):
    model = get_peft_model(moe_model("mixtral"), ASTConfig())
    model.base_model.model.set_experts_implementation(impl)
    model.train()
    model(ids, labels=ids).loss.backward()
    name, wrapper = expert_wrappers(model)[0]
    grad = wrapper.get_param().grad
    assert grad is not None and grad.abs().sum() > 0
    mask = wrapper.ast_mask["default"]
    assert grad[~mask].abs().sum() > 0  # straight-through: pruned weights get the effective weight's gradient


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_save_load_round_trip(arch, ids, tmp_path):
    model = get_peft_model(moe_model(arch), ASTConfig())
    with torch.no_grad():
        for _, wrapper in expert_wrappers(model):  # train-like change: the saved masks/weights must come back
            wrapper.get_param().mul_(1.5)
        model.base_model.update_masks()
        expected = model(ids).logits
    masks = {n: w.ast_mask["default"].clone() for n, w in expert_wrappers(model)}
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(moe_model(arch, seed=7), tmp_path / "adapter")
    assert loaded.peft_config["default"].target_parameters is None  # the saved config keeps the user's default
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-6)
    got = {n: w.ast_mask["default"] for n, w in expert_wrappers(loaded)}
    assert got.keys() == masks.keys() and all(torch.equal(got[n], masks[n]) for n in masks)
    assert all(not w.get_param().requires_grad for _, w in expert_wrappers(loaded))  # inference load: frozen
    trainable = PeftModel.from_pretrained(moe_model(arch, seed=7), tmp_path / "adapter", is_trainable=True)
    assert all(w.get_param().requires_grad for _, w in expert_wrappers(trainable))


def test_target_parameters_follow_peft_semantics():
    only_down = get_peft_model(moe_model("mixtral"), ASTConfig(target_parameters=["experts.down_proj"]))
    assert {n.rsplit(".", 1)[-1] for n, _ in expert_wrappers(only_down)} == {"down_proj"}
    dense = get_peft_model(moe_model("mixtral"), ASTConfig(target_parameters=[]))
    assert not expert_wrappers(dense)
    with pytest.raises(ValueError, match="target_parameters"):
        ASTConfig(target_parameters="experts.down_proj")


def test_slorb_on_experts_is_refused_naming_the_parameter():
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.experts\.\w+: SLoRB .*use_slorb"):
        get_peft_model(moe_model("mixtral"), ASTConfig(use_slorb=True))
    model = get_peft_model(moe_model("mixtral"), ASTConfig(use_slorb=True, target_parameters=[]))
    assert not expert_wrappers(model)


def test_masked_decay_optimizer_covers_expert_parameters():
    model = get_peft_model(moe_model("mixtral"), ASTConfig())
    opt = MaskedDecayAdamW(model.parameters(), lr=1e-2, masked_decay=1.0, model=model)
    assert opt.attach_masks(model) == len(expert_wrappers(model)) + len(list(find_ast_model(model)[0].ast_layers()))
    name, wrapper = expert_wrappers(model)[0]
    param, mask = wrapper.get_param(), wrapper.ast_mask["default"]
    before = param.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    moved = (param.detach() - before).abs()
    assert moved[~mask].min() > 0 and moved[mask].max() == 0  # zero loss gradient: only pruned weights decay


class _RoutingRecorder(TrainerCallback):
    """Records which experts receive tokens (a pre-hook on each outermost wrapper) and checks N:M every step."""

    def __init__(self):
        self.routed: dict[str, torch.Tensor] = {}
        self.steps = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        ast_model, _ = find_ast_model(model)
        for name, wrapper in ast_model.ast_expert_layers():
            experts_name = name.rsplit(".", 1)[0]
            if experts_name in self.routed:
                continue
            self.routed[experts_name] = torch.zeros(wrapper.num_experts, dtype=torch.bool)

            def hook(module, args, name=experts_name):
                if module.training:
                    self.routed[name][args[1].flatten().unique()] = True

            wrapper.register_forward_pre_hook(hook)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        ast_model, cfg = find_ast_model(model)
        for name, wrapper in ast_model.ast_expert_layers():
            mask = wrapper.ast_mask["default"]
            assert is_nm_sparse(mask, cfg.n, cfg.m, dim=wrapper.input_dim), name
            assert int(mask.sum()) * cfg.m == mask.numel() * cfg.n, name
        self.steps += 1


def _steer_router_away(model, experts: list[int]) -> None:
    """Routers with a bias (gpt-oss): ``experts`` never win the top-k, so they never receive a token."""
    for name, module in model.named_modules():
        if name.endswith("mlp.router"):
            with torch.no_grad():
                module.bias[experts] = -1e4


@pytest.mark.parametrize("arch,score", [("mixtral", "magnitude"), ("gpt_oss", "activation")])
def test_trainer_steps_keep_experts_nm_and_masks_move_only_in_routed_experts(arch, score, tmp_path):
    model = moe_model(arch, experts=8)
    if arch == "gpt_oss":
        _steer_router_away(model, [6, 7])  # routers with a bias: experts 6 and 7 never get a token
    initial = {n: p.detach().clone() for n, p, _ in expert_params(model)}
    config = ASTConfig(mask_update_interval=1, mask_score=score, masked_decay_peak=1e-3)
    recorder = _RoutingRecorder()
    args = ast_args(tmp_path, max_steps=4, learning_rate=3e-2, per_device_train_batch_size=2, ast_plot=False)
    trainer = ASTTrainer(model=model, args=args, ast_config=config, train_dataset=hamlet_blocks(16, 32),
                         data_collator=default_data_collator, callbacks=[recorder])
    before = {n: w.ast_mask["default"].clone() for n, w in expert_wrappers(trainer.model)}
    trainer.train()
    assert recorder.steps == 4
    moved_any = False
    for name, wrapper in expert_wrappers(trainer.model):
        changed = (wrapper.ast_mask["default"] != before[name]).flatten(1).any(dim=1)
        routed = recorder.routed[name.rsplit(".", 1)[0]]
        assert not (changed & ~routed).any(), (name, changed, routed)
        moved_any |= bool(changed.any())
    assert moved_any  # the recomputes did move masks (in experts that got tokens)
    if arch == "gpt_oss":
        assert not any(r[6:].any() for r in recorder.routed.values())
    merged = trainer.model.merge_and_unload()
    for name, param, dim in expert_params(merged):
        assert is_nm_sparse(param, 2, 4, dim=dim), name
        assert not torch.equal(param, initial[name] * (param != 0))  # trained


def test_resumed_run_matches_uninterrupted_with_expert_activation_scores(tmp_path):
    import shutil

    def trainer(output_dir):
        config = ASTConfig(mask_update_interval=2, mask_score="activation", masked_decay_peak=1e-3)
        args = ast_args(output_dir, max_steps=6, learning_rate=3e-2, per_device_train_batch_size=2, ast_plot=False,
                        save_strategy="steps", save_steps=3, logging_steps=1)
        return ASTTrainer(model=moe_model("mixtral", experts=4), args=args, ast_config=config,
                          train_dataset=hamlet_blocks(16, 24), data_collator=default_data_collator)

    full = trainer(tmp_path / "full")
    full.train()
    full_masks = {n: w.ast_mask["default"].clone() for n, w in expert_wrappers(full.model)}
    full_weights = {k: v.clone() for k, v in full.model.state_dict().items()}
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=True)
    for name, wrapper in expert_wrappers(resumed.model):
        assert torch.equal(wrapper.ast_mask["default"], full_masks[name]), name
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, full_weights[k], rtol=1e-4, atol=1e-5)


# ---- export and loading: packed [E, ...] expert tensors (format version 2) ----

def _trained_like(arch: str):
    model = get_peft_model(moe_model(arch), ASTConfig())
    with torch.no_grad():
        for _, wrapper in expert_wrappers(model):
            wrapper.get_param().mul_(1.25)  # pruned entries stay non-zero in the adapter: the mask must decide
    return model


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "qwen2_moe"])
def test_exported_experts_load_packed_and_match_merged_fp32(arch, ids, tmp_path):
    import copy

    from hf_sparse import HfSparseConfig
    from hf_sparse.format import FORMAT_VERSION, VALUES
    from hf_sparse.modules.packed_experts import PackedExpertWeight

    model = _trained_like(arch)
    hf_sparse_export(model, tmp_path / "e", HfSparseConfig(values_dtype="float32"))
    merged = copy.deepcopy(model).merge_and_unload()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "e", dtype=torch.float32)
    qc = loaded.config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    assert qc["format_version"] == FORMAT_VERSION == 2 and len(qc["expert_targets"]) == 4
    for name in qc["expert_targets"]:
        packed = loaded.get_submodule(name)
        assert isinstance(packed, PackedExpertWeight) and getattr(packed, VALUES).shape[0] == 8
        assert not any(n.endswith(name) for n, _ in loaded.named_parameters())  # no dense copy loaded
    with torch.no_grad():
        expected = merged(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-6)
        for impl in IMPLEMENTATIONS:  # every experts implementation reads the dequantized weight
            loaded.set_experts_implementation(impl)
            torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


def hf_sparse_export(model, out, config=None, **options):
    import hf_sparse

    return hf_sparse.export(model, out, config, **options)


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_exported_experts_equal_the_fake_quantized_reference(arch, bits, ids, tmp_path):
    import copy

    import hf_sparse

    model = _trained_like(arch)
    options = dict(bits=bits, group_size=32 if bits < 16 else None)
    hf_sparse.export(model, tmp_path / "e", **options)
    reference = hf_sparse.fake_quantize(copy.deepcopy(model), **options)
    for name, param, dim in expert_params(reference):
        assert is_nm_sparse(param, 2, 4, dim=dim), name
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "e", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-6)
    # a loaded model saves and reloads as it was (the packed tensors are its state)
    loaded.save_pretrained(tmp_path / "resaved")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-6)


def test_merged_model_exports_its_nm_experts(ids, tmp_path):
    import hf_sparse

    merged = _trained_like("mixtral").merge_and_unload()
    hf_sparse.export(merged, tmp_path / "e", hf_sparse.HfSparseConfig(values_dtype="float32"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "e", dtype=torch.float32)
    assert len(loaded.config.quantization_config.expert_targets) == 4
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-6)


def test_compressed_tensors_refuses_experts_naming_the_parameter(tmp_path):
    pytest.importorskip("compressed_tensors")
    from hf_sparse.exporters.compressed_tensors import export_compressed_tensors

    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.experts\.(gate_up|down)_proj"):
        export_compressed_tensors(_trained_like("mixtral"), tmp_path / "ct")


def test_expert_targets_need_format_version_2():
    from hf_sparse.format import FormatError, NMSpec

    with pytest.raises(FormatError, match="expert_targets needs format_version >= 2"):
        NMSpec(format_version=1, expert_targets=["model.layers.0.mlp.experts.gate_up_proj"])
    assert "expert_targets" not in NMSpec().to_dict()  # dense-expert exports write the same config as before


# ---- one-shot: Wanda/SparseGPT statistics per expert from the tokens the router sends it ----

@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_oneshot_experts_use_routed_tokens_and_fall_back_to_magnitude(method, caplog):
    from hf_sparse.oneshot.experts import prune_experts_oneshot
    from hf_sparse.sparsity.nm import nm_mask

    model = moe_model("gpt_oss")
    _steer_router_away(model, [6, 7])  # experts 6 and 7 get no calibration token: magnitude fallback
    dense = {n: p.detach().clone() for n, p, _ in expert_params(model)}
    seen = {}
    experts0 = model.model.layers[0].mlp.experts
    def capture(module, args):  # first calibration batch (the only one: batch_size=8)
        seen.setdefault("x", (args[0].detach().clone(), args[1].clone()))

    handle = experts0.register_forward_pre_hook(capture)
    calib = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.INFO, logger="hf_sparse.oneshot.experts"):
        masks = prune_experts_oneshot(model, method, calib, batch_size=8, min_tokens=4)
    handle.remove()
    assert "8 of 32 expert matrices had fewer than 4 routed calibration tokens" in caplog.text
    for name, param, dim in expert_params(model):
        assert is_nm_sparse(param, 2, 4, dim=dim) and torch.equal(masks[name], param != 0), name
        for e in (6, 7):  # no tokens: exactly the magnitude mask, weights untouched otherwise
            assert torch.equal(masks[name][e], nm_mask(dense[name][e].abs(), 2, 4, dim=dim - 1)), (name, e)
    if method == "wanda":  # a routed expert's mask is |W|·‖x‖ over exactly its routed tokens
        hidden, index = seen["x"]
        name = "model.layers.0.mlp.experts.gate_up_proj"
        for e in range(6):
            x = hidden[(index == e).any(-1)]
            score = dense[name][e].abs() * x.pow(2).sum(0).sqrt()[:, None]  # [in, out]: input dim 0
            assert torch.equal(masks[name][e], nm_mask(score, 2, 4, dim=0)), e


def test_experts_only_adapter_exports_and_loads(ids, tmp_path):
    import copy

    import hf_sparse

    model = get_peft_model(moe_model("mixtral"), ASTConfig(target_modules=[], target_parameters=["experts.down_proj"]))
    assert not list(find_ast_model(model)[0].ast_layers()) and len(expert_wrappers(model)) == 2
    hf_sparse.export(model, tmp_path / "e", hf_sparse.HfSparseConfig(values_dtype="float32"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "e", dtype=torch.float32)
    assert loaded.config.quantization_config.targets == []
    with torch.no_grad():
        expected = copy.deepcopy(model).merge_and_unload()(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-6)


def test_mask_init_oneshot_sets_expert_masks_from_routed_tokens():
    import copy

    from hf_sparse.oneshot.experts import prune_experts_oneshot
    from hf_sparse.training import initialize_ast_masks

    base = moe_model("mixtral")
    reference = prune_experts_oneshot(copy.deepcopy(base), "wanda", calib := torch.randint(0, VOCAB, (4, 32)))
    dense = {n: p.detach().clone() for n, p, _ in expert_params(base)}
    model = get_peft_model(base, ASTConfig(mask_init="wanda"))
    initialize_ast_masks(model, "wanda", calib, batch_size=8, progress=False)
    for name, wrapper in expert_wrappers(model):
        assert torch.equal(wrapper.ast_mask["default"], reference[name]), name
        assert torch.equal(wrapper.ast_initial_mask["default"], reference[name]), name
        assert torch.equal(wrapper.get_param().detach(), dense[name]), name  # AST keeps the pruned weights


# ---- DDP: 2 CPU processes (gloo); expert masks identical on every rank ----

def test_ddp_two_cpu_processes_same_expert_masks(tmp_path):
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", os.path.abspath(__file__),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert {r["world_size"] for r in ranks} == {2}
    assert ranks[0]["mask_digest"] == ranks[1]["mask_digest"]
    assert ranks[0]["weight_digest"] == pytest.approx(ranks[1]["weight_digest"], rel=1e-6)
    assert ranks[0]["flips_vs_initial"] > 0  # the expert masks moved, together


def _ddp_main(out: str) -> None:
    import json
    import os

    config = ASTConfig(mask_init="wanda", mask_update_interval=2, mask_score="activation", masked_decay_peak=1e-3)
    args = ast_args(os.path.join(out, "out"), max_steps=4, per_device_train_batch_size=2, learning_rate=3e-2,
                    ast_plot=False, ast_calibration_samples=4)
    trainer = ASTTrainer(model=moe_model("mixtral", experts=4), args=args, ast_config=config,
                         train_dataset=hamlet_blocks(16, 32), data_collator=default_data_collator)
    trainer.train()
    wrappers = expert_wrappers(trainer.model)
    masks = torch.cat([w.ast_mask["default"].flatten() for _, w in wrappers])
    initial = torch.cat([w.ast_initial_mask["default"].flatten() for _, w in wrappers])
    weights = torch.cat([w.get_param().detach().flatten() for _, w in wrappers])
    rank = torch.distributed.get_rank()
    result = {
        "world_size": torch.distributed.get_world_size(),
        "mask_digest": int((masks.long() * torch.arange(masks.numel()) % 1000003).sum()),
        "weight_digest": float(weights.double().abs().sum()),
        "flips_vs_initial": int((masks != initial).sum()),
        "initial_digest": int((initial.long() * torch.arange(initial.numel()) % 1000003).sum()),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def test_prune_oneshot_with_experts_prunes_linears_and_experts():
    from hf_sparse.oneshot import prune_oneshot

    model = moe_model("qwen2_moe")
    masks = prune_oneshot(model, "sparsegpt", torch.randint(0, VOCAB, (4, 32)), batch_size=4, progress=False,
                          experts=True)
    params = expert_params(model)
    assert {n for n, _, _ in params} <= set(masks) and any("shared_expert" in n for n in masks)
    for name, param, dim in params:
        assert is_nm_sparse(param, 2, 4, dim=dim) and torch.equal(masks[name], param != 0), name


def test_fsdp2_mask_sharding_refuses_unsharded_experts_naming_the_parameter():
    """FSDP2 with experts is tested in tests/test_fsdp2_moe.py; an expert weight no fully_shard covers is refused."""
    from hf_sparse.training.fsdp import shard_ast_masks

    model = get_peft_model(moe_model("mixtral"), ASTConfig(target_modules=[]))
    with pytest.raises(RuntimeError, match=r"layers\.0\.mlp\.experts\.\w+ was not sharded"):
        shard_ast_masks(find_ast_model(model)[0])


if __name__ == "__main__":
    import sys

    _ddp_main(*sys.argv[1:])
