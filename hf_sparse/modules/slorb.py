"""SLoRB (Sparse Low-Rank Boosting): a small dense branch ``S·(X·x)`` beside each N:M weight.

X (d/k × d) sums each group of k consecutive input channels; S (out × d/k) starts at the mean of the
weights the mask pruned in each group, so the branch gives back what pruning removed "on average".
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SLoRB", "slorb_mean_init"]


def slorb_mean_init(weight_out_in: torch.Tensor, mask_out_in: torch.Tensor, k: int) -> torch.Tensor:
    """S_ij = (1/k)·Σ_{p in group j} W_ip·¬M_ip for a weight in [out, in] layout."""
    pruned = weight_out_in.detach().float() * (~mask_out_in)
    return pruned.reshape(pruned.shape[0], -1, k).sum(-1) / k


class SLoRB(nn.Module):
    """y = S·(X·x). With a fixed X the group sums are a reshape-and-sum (no d/k×d matrix in memory)."""

    def __init__(self, in_features: int, out_features: int, k: int, train_projection: bool = False) -> None:
        super().__init__()
        if in_features % k:
            raise ValueError(f"SLoRB: in_features={in_features} is not divisible by `slorb_group_size`={k}")
        self.in_features, self.out_features, self.k = in_features, out_features, k
        self.S = nn.Parameter(torch.zeros(out_features, in_features // k))
        if train_projection:
            groups = torch.arange(in_features) // k
            X = (groups.unsqueeze(0) == torch.arange(in_features // k).unsqueeze(1)).float()
            self.X = nn.Parameter(X)
        else:
            self.register_parameter("X", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.S.dtype)
        if self.X is None:
            grouped = x.unflatten(-1, (self.in_features // self.k, self.k)).sum(-1)
        else:
            grouped = x @ self.X.t()
        return grouped @ self.S.t()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, k={self.k}, train_projection={self.X is not None}"
