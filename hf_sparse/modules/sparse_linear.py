"""SparseLinear: an N:M linear kept as a dense weight with stored zeros plus its SLoRB branch (a merged AST target)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .slorb import SLoRB

__all__ = ["SparseLinear", "linear_forward"]


def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], fan_in_fan_out: bool):
    """``x W^T + b`` for an nn.Linear weight, ``x W + b`` for a GPT-2 Conv1D one (``fan_in_fan_out``)."""
    if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmul picks the dtype itself
        weight = weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    if fan_in_fan_out:  # GPT-2 Conv1D: weight is [in, out]
        out = x.reshape(-1, x.shape[-1]) @ weight
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], weight.shape[1])
    return F.linear(x, weight, bias)


class SparseLinear(nn.Module):
    """What ``merge_and_unload`` leaves for a target with SLoRB: the N:M weight (zeros stored) plus the branch.

    Parameter names stay ``weight``/``bias`` so the layer's keys match the original module's.
    """

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], slorb: SLoRB, fan_in_fan_out: bool):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.slorb = slorb
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = slorb.in_features, slorb.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_forward(x, self.weight, self.bias, self.fan_in_fan_out) + self.slorb(x).to(x.dtype)
