"""The fused distillation loss equals its plain autograd specification (values and student-logit gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from conftest import tiny_model

from hf_sparse import ASTConfig
from hf_sparse.training.distill import IGNORE_INDEX, distillation_loss_sums, reference_distillation_loss_sums
from hf_sparse.tuners.ast import ASTLayer, masked_weight_ste


def _case(vocab_s=97, vocab_t=97, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(3, 11, vocab_s, generator=g) * 3).to(dtype).requires_grad_(True)
    teacher = (torch.randn(3, 11, vocab_t, generator=g) * 3).to(dtype)
    labels = torch.randint(0, min(vocab_s, vocab_t), (3, 11), generator=g)
    labels[0, :4] = IGNORE_INDEX  # prompt tokens
    labels[2, 7:] = IGNORE_INDEX  # padding
    return student, teacher, labels


def _loss_and_grad(fn, student, labels, teacher, alpha, temperature):
    student.grad = None
    parts = fn(student, labels, teacher, alpha=alpha, temperature=temperature)
    (parts.total * 0.37).backward()  # a non-unit upstream gradient must scale the fused gradient
    return parts, student.grad.detach().float().clone()


@pytest.mark.parametrize("alpha,temperature", [(0.67, 2.0), (1.0, 1.0), (0.5, 1.0), (0.0, 2.0), (1.0, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_matches_reference(alpha, temperature, dtype):
    student, teacher, labels = _case(dtype=dtype)
    ref, ref_grad = _loss_and_grad(reference_distillation_loss_sums, student, labels, teacher, alpha, temperature)
    got, grad = _loss_and_grad(distillation_loss_sums, student, labels, teacher, alpha, temperature)
    for name in ("total", "ce", "kl"):
        assert float(getattr(got, name).detach()) == pytest.approx(float(getattr(ref, name).detach()), rel=1e-5, abs=1e-4), name
    assert int(got.num_tokens) == int(ref.num_tokens) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    # bf16: the stored gradient and its upstream scaling each round once (2^-8 relative), the reference once
    tol = 1e-6 if dtype == torch.float32 else 2.0**-6 * float(ref_grad.abs().max())
    assert torch.allclose(grad, ref_grad, atol=tol, rtol=0), float((grad - ref_grad).abs().max())
    # rows that predict nothing (ignored labels, last position) get no gradient at all
    assert float(grad[0, :3].abs().sum()) == 0 and float(grad[:, -1].abs().sum()) == 0


@pytest.mark.parametrize("vocab_s,vocab_t", [(97, 101), (104, 97)])
def test_fused_loss_with_padded_vocabularies(vocab_s, vocab_t):
    student, teacher, labels = _case(vocab_s, vocab_t)
    ref, ref_grad = _loss_and_grad(reference_distillation_loss_sums, student, labels, teacher, 0.67, 2.0)
    got, grad = _loss_and_grad(distillation_loss_sums, student, labels, teacher, 0.67, 2.0)
    assert float(got.total.detach()) == pytest.approx(float(ref.total.detach()), rel=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-6)


def test_fused_loss_is_a_sum_so_batches_split_exactly():
    """Gradient accumulation and DDP divide summed losses by the global token count: halves must add up."""
    student, teacher, labels = _case()
    whole = distillation_loss_sums(student, labels, teacher, alpha=0.67, temperature=2.0)
    halves = [distillation_loss_sums(student[i], labels[i], teacher[i], 0.67, 2.0) for i in (slice(0, 1), slice(1, 3))]
    assert float(sum(h.total for h in halves).detach()) == pytest.approx(float(whole.total.detach()), rel=1e-6)
    assert int(sum(h.num_tokens for h in halves)) == int(whole.num_tokens)


def test_fused_loss_without_teacher_is_cross_entropy_and_skips_gradient_under_no_grad():
    student, _, labels = _case()
    with torch.no_grad():
        parts = distillation_loss_sums(student, labels, None, alpha=0.67)
    expected = F.cross_entropy(student[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), reduction="sum")
    assert float(parts.total) == pytest.approx(float(expected), rel=1e-6)
    assert float(parts.kl) == 0 and not parts.total.requires_grad


def test_fused_loss_rejects_bad_arguments():
    student, teacher, labels = _case()
    with pytest.raises(ValueError, match="labels"):
        distillation_loss_sums(student, labels[:, :-1], teacher)
    with pytest.raises(ValueError, match="teacher logits"):
        distillation_loss_sums(student, labels, teacher[:, :-1])
    with pytest.raises(ValueError, match="`alpha`"):
        distillation_loss_sums(student, labels, teacher, alpha=1.5)
    with pytest.raises(ValueError, match="`temperature`"):
        distillation_loss_sums(student, labels, teacher, temperature=0)


def test_masked_weight_is_cast_once_under_autocast_and_gradient_stays_fp32(input_ids):
    """Under bf16 autocast the STE emits the bf16 masked weight the matmul needs; the dense fp32 weight gets its grad."""
    model = get_peft_model(tiny_model("llama"), ASTConfig())
    layer = next(m for m in model.modules() if isinstance(m, ASTLayer))
    weight, mask = layer.get_base_layer().weight, layer.ast_mask["default"]
    x = torch.randn(5, layer.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eff = masked_weight_ste(weight, mask)
        out = layer(x)
        expected = F.linear(x, weight * mask)
    assert eff.dtype == torch.bfloat16 and torch.equal(eff.float(), (weight * mask).bfloat16().float())
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32
    assert weight.grad[~mask].abs().sum() > 0  # STE: pruned weights still get gradient


def test_fused_loss_backward_twice_with_retained_graph():
    student, teacher, labels = _case()
    parts = distillation_loss_sums(student, labels, teacher, alpha=0.67, temperature=2.0)
    (parts.total * 2.0).backward(retain_graph=True)
    first = student.grad.clone()
    student.grad = None
    (parts.total * 0.5).backward()
    torch.testing.assert_close(student.grad, first / 4)
