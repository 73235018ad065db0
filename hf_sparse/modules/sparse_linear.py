"""SparseLinear: an N:M linear kept as a dense weight with stored zeros plus its SLoRB branch (a merged AST target)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .slorb import SLoRB

__all__ = ["SparseConv1D", "SparseLinear", "linear_forward"]


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

    Parameter names stay ``weight``/``bias`` so the layer's keys match the original module's. Build one with
    :meth:`build`, which gives a :class:`SparseConv1D` for a GPT-2 ``Conv1D`` layout. A merged model's config records
    these modules so that transformers' ``from_pretrained`` rebuilds them (:mod:`hf_sparse.tuners.ast.merged`).
    """

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], slorb: SLoRB, fan_in_fan_out: bool):
        nn.Module.__init__(self)  # not super().__init__(): in SparseConv1D's MRO it would be Conv1D.__init__(nf, nx)
        self.weight = weight
        self.bias = bias
        self.slorb = slorb
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = slorb.in_features, slorb.out_features

    @staticmethod
    def build(weight: nn.Parameter, bias: Optional[nn.Parameter], slorb: SLoRB, fan_in_fan_out: bool) -> "SparseLinear":
        """A SparseLinear, or a SparseConv1D when the weight is in GPT-2's ``[in, out]`` Conv1D layout."""
        cls = SparseConv1D if fan_in_fan_out else SparseLinear
        return cls(weight, bias, slorb, fan_in_fan_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_forward(x, self.weight, self.bias, self.fan_in_fan_out) + self.slorb(x).to(x.dtype)


class SparseConv1D(SparseLinear, Conv1D):
    """A SparseLinear of a GPT-2 ``Conv1D`` target (weight ``[in, out]``) that is still a ``Conv1D``.

    Code that reads the weight layout from ``isinstance(module, Conv1D)`` (PEFT's LoRA, the merged-checkpoint reader
    of ``hf_sparse.export``) reads it right. Its forward is SparseLinear's (weight plus branch).
    """

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], slorb: SLoRB, fan_in_fan_out: bool = True):
        if not fan_in_fan_out:
            raise ValueError("SparseConv1D: argument `fan_in_fan_out` must be True (use SparseLinear for nn.Linear)")
        super().__init__(weight, bias, slorb, True)
        self.nf, self.nx = self.out_features, self.in_features  # Conv1D's attribute names

    __repr__ = nn.Module.__repr__  # Conv1D's repr would hide the branch
