"""Wanda N:M pruning (Sun et al. 2023): score |W_ij|·‖X_j‖₂ over calibration tokens, no weight update.

The input-channel norm makes a small weight on a loud input channel worth keeping; the N:M choice is made
within each group of M consecutive input columns of a row, as for every method here.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..sparsity.nm import nm_mask
from ..sparsity.scores import activation_scaled_score, magnitude_score
from .registry import OneShotPruner, register_pruner


@register_pruner("wanda")
class WandaPruner(OneShotPruner):
    """Accumulates Σ x_j² per input channel; prunes by |W_ij|·sqrt(Σ x_j²)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sq: Optional[torch.Tensor] = None

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        rows = self._rows(x)
        sq = rows.pow(2).sum(0)
        self.sq = sq if self.sq is None else self.sq.add_(sq)
        self.num_tokens += rows.shape[0]

    @torch.no_grad()
    def prune(self) -> torch.Tensor:
        weight = self.module.weight
        if self.sq is None or not bool(self.sq.any()):  # no token reached this module (e.g. an unused expert)
            score = magnitude_score(weight)
        else:
            score = activation_scaled_score(weight, self.sq.sqrt(), input_dim=self.input_dim)
        mask = nm_mask(score, self.n, self.m, dim=self.input_dim)
        weight.data.mul_(mask.to(weight.dtype))
        return mask

    def free(self) -> None:
        self.sq = None
