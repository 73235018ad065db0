"""The masked-decay AdamW: the paper's update, exactly; kept weights never decayed; HF schedulers and state."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from conftest import tiny_model
from transformers import get_cosine_schedule_with_warmup

from hf_sparse import ASTConfig
from hf_sparse.training import MaskedDecayAdamW, masked_decay_lambda
from hf_sparse.training.callbacks import find_ast_model


def _reference_step(w, g, mask, state, lr, b1, b2, eps, wd, lam):
    """The update of ast-method.md written out one line per equation."""
    state["t"] += 1
    t = state["t"]
    w = w * (1 - lr * wd)
    state["m"] = b1 * state["m"] + (1 - b1) * g
    u = state["m"] + lam * (~mask) * w
    state["v"] = b2 * state["v"] + (1 - b2) * u * u
    return w - lr / (1 - b1**t) * u / ((state["v"] / (1 - b2**t)).sqrt() + eps)


def _ast_model(seed=0):
    return peft.get_peft_model(tiny_model("llama", seed=seed), ASTConfig())


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_reference_update_for_masked_and_plain_params(foreach):
    model = _ast_model()
    ast_model, _ = find_ast_model(model)
    name, layer = next(ast_model.ast_layers())
    weight = layer.get_base_layer().weight
    mask = layer.ast_mask["default"]
    other = model.base_model.model.model.embed_tokens.weight
    lr, b1, b2, eps, wd, lam = 1e-2, 0.9, 0.95, 1e-8, 0.1, 0.3
    opt = MaskedDecayAdamW(
        [weight, other], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, model=model, foreach=foreach
    )
    assert opt.has_masks
    ref_w, ref_o = weight.detach().clone(), other.detach().clone()
    st_w = {"t": 0, "m": torch.zeros_like(ref_w), "v": torch.zeros_like(ref_w)}
    opt_o = torch.optim.AdamW([ref_o.requires_grad_()], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        gw, go = torch.randn(weight.shape, generator=g), torch.randn(other.shape, generator=g)
        weight.grad, other.grad = gw.clone(), go.clone()
        opt.set_masked_decay(lam)
        opt.step()
        ref_w = _reference_step(ref_w, gw, mask, st_w, lr, b1, b2, eps, wd, lam)
        ref_o.grad = go.clone()
        opt_o.step()  # unmasked params: plain torch AdamW
    torch.testing.assert_close(weight.detach(), ref_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other.detach(), ref_o.detach(), rtol=1e-5, atol=1e-6)
    # decay stays out of the first moment: exp_avg is the EMA of the loss gradients alone
    torch.testing.assert_close(opt.state[weight]["exp_avg"], st_w["m"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("foreach", [False, True])
def test_only_pruned_weights_decay(foreach):
    """Zero loss gradient, λ > 0: pruned weights shrink towards 0, kept weights do not move at all."""
    model = _ast_model()
    ast_model, _ = find_ast_model(model)
    targets = [(layer.get_base_layer().weight, layer.ast_mask["default"]) for _, layer in ast_model.ast_layers()]
    before = [w.detach().clone() for w, _ in targets]
    opt = MaskedDecayAdamW([w for w, _ in targets], lr=1e-3, masked_decay=1e-2, model=model, foreach=foreach)
    for _ in range(10):
        for w, _ in targets:
            w.grad = torch.zeros_like(w)
        opt.step()
    for (w, mask), w0 in zip(targets, before):
        assert mask.dtype == torch.bool
        torch.testing.assert_close(w[mask], w0[mask], rtol=0, atol=0)
        assert w[~mask].norm() < 0.8 * w0[~mask].norm()


def test_lambda_schedule_and_state_roundtrip():
    assert masked_decay_lambda(0, 1e-4, 100) == 0
    assert masked_decay_lambda(50, 1e-4, 100) == pytest.approx(5e-5)
    assert masked_decay_lambda(100, 1e-4, 100) == masked_decay_lambda(4000, 1e-4, 100) == pytest.approx(1e-4)
    model = _ast_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = MaskedDecayAdamW(params, lr=1e-3, model=model)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10)
    for step in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.set_masked_decay(1e-3 * (step + 1))
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 1 / 8)))
    restored = MaskedDecayAdamW([p for p in _ast_model().parameters() if p.requires_grad], lr=1e-3)
    restored.load_state_dict(opt.state_dict())
    assert restored.param_groups[0]["masked_decay"] == pytest.approx(3e-3)
    assert not restored.has_masks  # masks come from the model, never from the optimizer file
    assert restored.attach_masks(model) == 0  # params of another model are not attached


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="MaskedDecayAdamW"):
        MaskedDecayAdamW([torch.nn.Parameter(torch.zeros(2))], lr=-1)
