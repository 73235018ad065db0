"""The AST loss: ``α·T²·KL(p_teacher ‖ p_student) + (1−α)·CE`` summed over real tokens only.

Sums (not means) are returned so the trainer can divide by the token count of the whole accumulated batch
(``num_items_in_batch``): that makes gradient accumulation and multi-device runs exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["DistillLoss", "distillation_loss_sums", "IGNORE_INDEX"]

IGNORE_INDEX = -100


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

    ``teacher_logits`` may be None (or ``alpha`` 0): the loss is CE only.
    """
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(student_logits.shape)} and labels {tuple(labels.shape)} do not match")
    targets = labels[..., 1:]
    valid = targets != IGNORE_INDEX
    s = student_logits[..., :-1, :][valid].float()
    ce = F.cross_entropy(s, targets[valid], reduction="sum")
    kl = torch.zeros((), device=s.device)
    if teacher_logits is not None and alpha > 0:
        if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} do not match student logits {tuple(student_logits.shape)}"
            )
        vocab = min(s.shape[-1], teacher_logits.shape[-1])  # tokenizers padded to different multiples
        t = teacher_logits[..., :-1, :][valid.to(teacher_logits.device)].to(s.device).float()
        log_p_student = F.log_softmax(s[:, :vocab] / temperature, dim=-1)
        log_p_teacher = F.log_softmax(t[:, :vocab] / temperature, dim=-1)
        kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum") * temperature**2
        total = alpha * kl + (1.0 - alpha) * ce
    else:
        total = ce
    return DistillLoss(total=total, ce=ce.detach(), kl=kl.detach(), num_tokens=valid.sum())
