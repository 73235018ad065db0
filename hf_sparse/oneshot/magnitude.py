"""Magnitude N:M pruning: keep the N largest |w| of every M consecutive input weights (no data needed)."""

from __future__ import annotations

import torch

from ..sparsity.nm import nm_mask
from ..sparsity.scores import magnitude_score
from .registry import OneShotPruner, register_pruner


@register_pruner("magnitude")
class MagnitudePruner(OneShotPruner):
    """|W| score; the baseline every activation-aware method must beat."""

    needs_calibration = False

    @torch.no_grad()
    def prune(self) -> torch.Tensor:
        weight = self.module.weight
        mask = nm_mask(magnitude_score(weight), self.n, self.m, dim=self.input_dim)
        weight.data.mul_(mask.to(weight.dtype))
        return mask
