"""SLoRB (Sparse Low-Rank Boosting): a small dense branch ``weight·(projection·x)`` beside each N:M weight.

``projection`` (d/k × d; the paper's X) sums each group of k consecutive input channels; ``weight`` (out × d/k;
the paper's S) starts at the mean of the weights the mask pruned in each group, so the branch gives back what
pruning removed "on average". Checkpoints written before format version 2 call them ``S`` and ``X``: loading
maps those names (:data:`LEGACY_NAMES`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["LEGACY_NAMES", "SLoRB", "slorb_mean_init"]

# tensor names of format version 1 and adapters saved by hf_sparse 0.1 -> today's names
LEGACY_NAMES = {"S": "weight", "X": "projection"}


def slorb_mean_init(weight_out_in: torch.Tensor, mask_out_in: torch.Tensor, k: int) -> torch.Tensor:
    """S_ij = (1/k)·Σ_{p in group j} W_ip·¬M_ip for a weight in [out, in] layout."""
    pruned = weight_out_in.detach().float() * (~mask_out_in)
    return pruned.reshape(pruned.shape[0], -1, k).sum(-1) / k


class SLoRB(nn.Module):
    """y = weight·(projection·x). With a fixed projection the group sums are a reshape-and-sum (no d/k×d matrix)."""

    def __init__(self, in_features: int, out_features: int, k: int, train_projection: bool = False) -> None:
        super().__init__()
        if in_features % k:
            raise ValueError(f"SLoRB: in_features={in_features} is not divisible by `slorb_group_size`={k}")
        self.in_features, self.out_features, self.k = in_features, out_features, k
        self.weight = nn.Parameter(torch.zeros(out_features, in_features // k))
        if train_projection:
            groups = torch.arange(in_features) // k
            projection = (groups.unsqueeze(0) == torch.arange(in_features // k).unsqueeze(1)).float()
            self.projection = nn.Parameter(projection)
        else:
            self.register_parameter("projection", None)
        self._register_load_state_dict_pre_hook(_rename_legacy_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if self.projection is None:
            grouped = x.unflatten(-1, (self.in_features // self.k, self.k)).sum(-1)
        else:
            grouped = x @ self.projection.t()
        return grouped @ self.weight.t()

    @property
    def S(self) -> nn.Parameter:  # noqa: N802 - the old name, kept for code written against hf_sparse 0.1
        warnings.warn("SLoRB.S is deprecated: use SLoRB.weight", DeprecationWarning, stacklevel=2)
        return self.weight

    @property
    def X(self) -> nn.Parameter | None:  # noqa: N802
        warnings.warn("SLoRB.X is deprecated: use SLoRB.projection", DeprecationWarning, stacklevel=2)
        return self.projection

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, k={self.k}, "
            f"train_projection={self.projection is not None}"
        )


def _rename_legacy_keys(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Adapters saved before the rename hold ``<prefix>S``/``<prefix>X``: load them into weight/projection."""
    for old, new in LEGACY_NAMES.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
