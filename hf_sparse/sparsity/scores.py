"""Importance scores that an N:M mask can be chosen from.

A score has the weight's shape; larger means "keep". Magnitude is the paper's choice for AST's
periodic recomputes; the activation-aware score (Wanda's |W|·‖x‖) uses per-input-channel norms.
"""

from __future__ import annotations

import torch

__all__ = ["magnitude_score", "activation_scaled_score"]


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """|W|: the paper's recompute score."""
    return weight.detach().abs()


def activation_scaled_score(weight: torch.Tensor, input_norm: torch.Tensor, input_dim: int = 1) -> torch.Tensor:
    """|W_ij|·‖x_j‖ (Wanda): ``input_norm`` holds one L2 norm per input channel."""
    if input_norm.numel() != weight.shape[input_dim]:
        raise ValueError(
            f"input_norm has {input_norm.numel()} entries but the weight has {weight.shape[input_dim]} input channels"
        )
    shape = [1] * weight.dim()
    shape[input_dim] = -1
    return weight.detach().abs() * input_norm.to(weight.device, torch.float32).reshape(shape)
