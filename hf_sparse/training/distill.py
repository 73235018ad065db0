"""The AST loss: ``α·T²·KL(p_teacher ‖ p_student) + (1−α)·CE`` summed over real tokens only.

Sums (not means) are returned so the trainer can divide by the token count of the whole accumulated batch
(``num_items_in_batch``): that makes gradient accumulation and multi-device runs exact.

The loss is computed in row chunks by one autograd function that writes the gradient w.r.t. the student logits
during the forward (closed form: ``α·T·(softmax(s/T) − softmax(t/T)) + (1−α)·(softmax(s) − onehot)``), the way
fused cross-entropy kernels do. With a 49k vocabulary the logits dominate the step's memory traffic: the unfused
autograd graph (float copies, two log-softmaxes, ``kl_div`` and their backwards over every logit) cost 1.7 s per
4×256 batch on 2 CPU cores, the fused one a fraction of that (``benchmarks/train_overhead.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

__all__ = ["DistillLoss", "distillation_loss_sums", "IGNORE_INDEX"]

IGNORE_INDEX = -100
# rows per chunk = these elements // vocab: ~1 MB of float32 stays cache-resident on a CPU; GPUs want big launches
_CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}


@dataclass
class DistillLoss:
    """Summed loss terms over ``num_tokens`` real (shifted) tokens."""

    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    num_tokens: torch.Tensor


def distillation_loss_sums(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    alpha: float = 0.67,
    temperature: float = 2.0,
) -> DistillLoss:
    """Causal-LM loss sums: position i predicts ``labels[i+1]``; positions whose label is −100 do not count.

    ``teacher_logits`` may be None (or ``alpha`` 0): the loss is CE only. Teacher and student vocabularies may
    differ in padding: the KL runs over the common first ``min(V_student, V_teacher)`` entries.
    """
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(student_logits.shape)} and labels {tuple(labels.shape)} do not match")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"argument `alpha` must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"argument `temperature` must be > 0, got {temperature}")
    use_teacher = teacher_logits is not None and alpha > 0
    if use_teacher and teacher_logits.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} do not match student logits {tuple(student_logits.shape)}"
        )
    vocab = student_logits.shape[-1]
    # rows of the flattened [B*L, V] logits that predict a real next token
    targets = labels.new_full(labels.shape, IGNORE_INDEX)
    targets[..., :-1] = labels[..., 1:]
    targets = targets.reshape(-1).to(student_logits.device)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    student_flat = student_logits.reshape(-1, vocab)
    teacher_flat = teacher_logits.reshape(-1, teacher_logits.shape[-1]) if use_teacher else None
    # ctx.needs_input_grad is True even under no_grad (evaluation): decide here whether to form the gradient
    form_grad = torch.is_grad_enabled() and student_logits.requires_grad
    total, ce, kl = _FusedDistillLoss.apply(
        student_flat, teacher_flat, targets, rows, alpha if use_teacher else 0.0, float(temperature), form_grad
    )
    num_tokens = torch.tensor(rows.numel(), device=student_logits.device)
    return DistillLoss(total=total, ce=ce.detach(), kl=kl.detach(), num_tokens=num_tokens)


class _FusedDistillLoss(torch.autograd.Function):
    """Loss sums over the selected rows; the student-logit gradient is formed chunk by chunk in the forward."""

    @staticmethod
    def forward(  # noqa: D401
        ctx: Any,
        student: torch.Tensor,
        teacher: Optional[torch.Tensor],
        targets: torch.Tensor,
        rows: torch.Tensor,
        alpha: float,
        temperature: float,
        form_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        needs_grad = form_grad and ctx.needs_input_grad[0]
        grad = None
        if needs_grad:  # rows outside ``rows`` (ignored labels, last position) get zero; the rest is written below
            grad = torch.empty_like(student)
            unused = torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
            unused[rows] = False
            grad[unused] = 0
        ce_sum = torch.zeros((), dtype=torch.float32, device=student.device)
        kl_sum = torch.zeros((), dtype=torch.float32, device=student.device)
        vocab = student.shape[-1] if teacher is None else min(student.shape[-1], teacher.shape[-1])
        step = max(1, _CHUNK_ELEMENTS.get(student.device.type, 1 << 22) // student.shape[-1])
        for start in range(0, rows.numel(), step):
            idx = rows[start : start + step]
            s = student.index_select(0, idx).float()
            tgt = targets.index_select(0, idx)
            lse = torch.logsumexp(s, dim=-1)
            ce_sum += (lse - s.gather(1, tgt[:, None]).squeeze(1)).sum()
            g = None
            if needs_grad:  # (1−α)·(softmax(s) − onehot)
                g = torch.exp(s - lse[:, None]).mul_(1.0 - alpha)
                g.scatter_add_(1, tgt[:, None], torch.full_like(lse[:, None], alpha - 1.0))
            if alpha > 0:
                t = teacher.index_select(0, idx.to(teacher.device)).to(s.device, torch.float32)[:, :vocab]
                if temperature != 1.0:
                    t = t.div_(temperature)
                    s_t = s[:, :vocab] / temperature
                    log_ps = torch.log_softmax(s_t, dim=-1)
                else:
                    log_ps = (s[:, :vocab] - lse[:, None]) if vocab == s.shape[-1] else torch.log_softmax(
                        s[:, :vocab], dim=-1
                    )
                log_pt = torch.log_softmax(t, dim=-1)
                p_t = log_pt.exp()
                kl_sum += (p_t * (log_pt - log_ps)).sum() * temperature**2
                if g is not None:  # α·T²·d/ds KL = α·T·(softmax(s/T) − softmax(t/T))
                    g[:, :vocab].add_(log_ps.exp_().sub_(p_t), alpha=alpha * temperature)
            if g is not None:
                grad.index_copy_(0, idx, g.to(grad.dtype))
        total = alpha * kl_sum + (1.0 - alpha) * ce_sum
        ctx.grad = grad  # an intermediate, not an input/output: kept on ctx (scaled in place in backward)
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        return total, ce_sum, kl_sum

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, _grad_ce: Any, _grad_kl: Any):
        grad = ctx.grad
        # scale in place: a second full-vocabulary buffer costs more than the math (fresh pages every step);
        # a retained graph's repeated backward rescales from the previous factor
        scale = grad_total.to(grad.dtype)
        previous = getattr(ctx, "applied_scale", None)
        if previous is not None and not bool(previous != 0):
            raise RuntimeError(
                "distillation loss: backward through a retained graph after a first backward scaled by 0; "
                "the fused gradient was zeroed in place. Recompute the loss instead of retaining the graph."
            )
        grad.mul_(scale if previous is None else scale / previous)
        ctx.applied_scale = scale
        return grad, None, None, None, None, None, None


def reference_distillation_loss_sums(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    alpha: float = 0.67,
    temperature: float = 2.0,
) -> DistillLoss:
    """The same loss written plainly with autograd (slow, memory-hungry): the specification the fused one meets."""
    targets = labels[..., 1:]
    valid = targets != IGNORE_INDEX
    s = student_logits[..., :-1, :][valid].float()
    ce = F.cross_entropy(s, targets[valid], reduction="sum")
    kl = torch.zeros((), device=s.device)
    if teacher_logits is not None and alpha > 0:
        vocab = min(s.shape[-1], teacher_logits.shape[-1])
        t = teacher_logits[..., :-1, :][valid.to(teacher_logits.device)].to(s.device).float()
        log_p_student = F.log_softmax(s[:, :vocab] / temperature, dim=-1)
        log_p_teacher = F.log_softmax(t[:, :vocab] / temperature, dim=-1)
        kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum") * temperature**2
        total = alpha * kl + (1.0 - alpha) * ce
    else:
        total = ce
    return DistillLoss(total=total, ce=ce.detach(), kl=kl.detach(), num_tokens=valid.sum())
