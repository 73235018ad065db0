"""ASTConfig(schedule="progressive"): CAST-style dense forward, L1 decay outside the mask, the final hard prune."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from peft import get_peft_model
from test_training_utils import ast_args, hamlet_blocks
from transformers import TrainerCallback, default_data_collator

import hf_sparse
from hf_sparse import ASTConfig, ASTTrainer, is_nm_sparse
from hf_sparse.training.callbacks import find_ast_model
from hf_sparse.training.progressive import ProgressiveCallback, progressive_ramp
from hf_sparse.tuners.ast.progressive import add_l1_decay_to_grad, finalize_progressive


def _progressive(arch: str = "llama", **kw):
    return get_peft_model(tiny_model(arch), ASTConfig(schedule="progressive", **kw))


def test_config_replaces_the_masked_decay_and_refuses_slorb():
    cfg = ASTConfig(schedule="progressive", masked_decay_peak=1e-3)
    assert cfg.masked_decay_peak == 0.0 and cfg.cast_decay == 1e-4
    with pytest.raises(ValueError, match="use_slorb"):
        ASTConfig(schedule="progressive", use_slorb=True)
    with pytest.raises(ValueError, match="schedule"):
        ASTConfig(schedule="cast")
    with pytest.raises(ValueError, match="cast_decay"):
        ASTConfig(schedule="progressive", cast_decay=-1.0)


def test_half_rows_must_hold_whole_groups():
    model = torch.nn.Sequential(torch.nn.Linear(12, 8))  # 12 inputs: halves of 6 split a 4-group
    with pytest.raises(ValueError, match=r"0: .*divisible by 2\*m=8"):
        get_peft_model(model, ASTConfig(schedule="progressive", target_modules=["0"]))
    get_peft_model(torch.nn.Sequential(torch.nn.Linear(12, 8)),
                   ASTConfig(schedule="progressive", target_modules=["0"], cast_scales=False))  # no scales: fine


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_is_dense_until_the_final_prune(arch, input_ids):
    dense = tiny_model(arch)
    model = _progressive(arch).eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids).logits, dense(input_ids).logits, atol=1e-6)
    scales = [p for n, p in model.named_parameters() if "ast_cast_scale" in n]
    assert scales and all(p.requires_grad and p.shape[1] == 2 for p in scales)


def _scaled_and_pruned_reference(model, arch):
    """A plain model whose target weights are (W ⊙ mask) · scale, the scales written out by hand (halves of the row)."""
    ref = tiny_model(arch)
    ast_model, _ = find_ast_model(model)
    ref_modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, layer in ast_model.ast_layers():
            w = layer._out_in(layer.get_base_layer().weight)  # [out, in]
            mask = layer._out_in(layer.ast_mask["default"])
            s = layer.ast_cast_scale["default"]
            half = w.shape[1] // 2
            scale = torch.cat([s[:, :1].expand(-1, half), s[:, 1:].expand(-1, w.shape[1] - half)], dim=1)
            target = ref_modules[name]
            new = (w * mask) * scale
            target.weight.copy_(new.t() if layer.fan_in_fan_out else new)
    return ref.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_final_prune_is_exact_nm_with_the_scales_folded_in(arch, input_ids):
    model = _progressive(arch).eval()
    ast_model, cfg = find_ast_model(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in ast_model.ast_layers():
            layer.ast_cast_scale["default"].copy_(0.5 + torch.rand(layer.out_features, 2, generator=g))
    reference = _scaled_and_pruned_reference(model, arch)
    summary = finalize_progressive(ast_model)
    assert summary["layers"] == len(list(ast_model.ast_layers())) and 0 < summary["pruned_norm_fraction"] < 1
    for name, layer in ast_model.ast_layers():
        w = layer.get_base_layer().weight
        mask = layer.ast_mask["default"]
        assert is_nm_sparse(w, cfg.n, cfg.m, dim=layer.input_dim), name
        assert int((w != 0).sum()) == int(mask.sum()) == mask.numel() // 2, name  # exactly 2 of every 4 kept
        assert torch.equal(layer.ast_cast_scale["default"], torch.ones_like(layer.ast_cast_scale["default"]))
        assert not layer.ast_cast_scale["default"].requires_grad and not bool(layer.ast_cast_dense["default"])
    with torch.no_grad():
        folded = model(input_ids).logits
        assert torch.allclose(folded, reference(input_ids).logits, atol=1e-5)
        merged = copy.deepcopy(model).merge_and_unload()
        assert torch.allclose(merged(input_ids).logits, folded, atol=1e-6)
    assert finalize_progressive(ast_model)["layers"] == 0  # once only


def test_merge_before_the_final_prune_is_refused():
    model = _progressive()
    with pytest.raises(ValueError, match="final N:M prune"):
        model.merge_and_unload()


def test_l1_decay_enters_the_gradient_only_outside_the_mask():
    model = _progressive()
    ast_model, _ = find_ast_model(model)
    name, layer = next(iter(ast_model.ast_layers()))
    w = layer.get_base_layer().weight
    w.grad = torch.full_like(w, 0.25)
    add_l1_decay_to_grad(ast_model, 0.1)
    mask = layer.ast_mask["default"]
    expected = 0.25 + 0.1 * torch.sign(w.detach()) * (~mask)
    assert torch.equal(w.grad, expected)
    assert progressive_ramp(0, 10) == 0.0 and progressive_ramp(5, 10) == 0.5 and progressive_ramp(20, 10) == 1.0


class Watch(TrainerCallback):
    def __init__(self):
        self.scale_moved = False
        self.dense_forward = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        ast_model, _ = find_ast_model(model)
        for _, layer in ast_model.ast_layers():
            s = layer.ast_cast_scale["default"]
            self.scale_moved |= not torch.equal(s, torch.ones_like(s))
            self.dense_forward.append(bool(layer.ast_cast_dense["default"]))


def test_progressive_trainer_run_ends_exact_nm_and_exports(tmp_path, input_ids):
    model = tiny_model("llama")
    cfg = ASTConfig(schedule="progressive", cast_decay=1e-2, mask_update_interval=2)
    watch = Watch()
    trainer = ASTTrainer(model=model, args=ast_args(tmp_path, max_steps=6, ast_plot=False, logging_steps=2),
                         ast_config=cfg, train_dataset=hamlet_blocks(32), data_collator=default_data_collator,
                         callbacks=[watch])
    progressive = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressiveCallback))
    trainer.train()
    assert watch.scale_moved and all(watch.dense_forward)  # scales learn; the forward stayed dense while training
    assert progressive.final["layers"] > 0 and progressive.current_decay == pytest.approx(1e-2)  # ramp reached 1
    assert any("ast/cast_decay" in h for h in trainer.state.log_history)
    ast_model, _ = find_ast_model(trainer.model)
    for name, layer in ast_model.ast_layers():
        assert is_nm_sparse(layer.get_base_layer().weight, 2, 4, dim=layer.input_dim), name
    out = tmp_path / "export"
    hf_sparse.export(trainer.model, out, bits=16)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        # kept values are stored in 16 bits: the logits agree to fp16 rounding
        assert torch.allclose(reloaded(input_ids).logits, trainer.model.eval()(input_ids).logits, atol=1e-2)


def test_adapter_round_trip_keeps_scales_and_phase(tmp_path, input_ids):
    import warnings

    from peft import PeftModel

    model = _progressive()
    ast_model, _ = find_ast_model(model)
    with torch.no_grad():
        for _, layer in ast_model.ast_layers():
            layer.ast_cast_scale["default"].mul_(1.5)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "missing adapter keys"
        loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    loaded_ast, _ = find_ast_model(loaded)
    for _, layer in loaded_ast.ast_layers():
        assert torch.equal(layer.ast_cast_scale["default"], torch.full_like(layer.ast_cast_scale["default"], 1.5))
        assert bool(layer.ast_cast_dense["default"]) and layer.ast_cast_scale["default"].requires_grad
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids).logits, model(input_ids).logits, atol=1e-6)
