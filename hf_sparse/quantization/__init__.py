"""Quantization of the kept values of N:M weights (RTN, mask-keeping GPTQ) into the format's packed tensors."""

from __future__ import annotations

from typing import Optional

import torch

from ..format import NMSpec
from .config import EXPORT_OPTIONS, HfSparseConfig
from .gptq import pack_gptq
from .registry import QUANTIZATION_METHODS, QuantizationMethod, get_quantization_method, register_quantization_method
from .rtn import PackedWeight, pack_rtn, quantize_groups


def fake_quantize_weight(weight: torch.Tensor, mask: torch.Tensor, spec: NMSpec,
                         hessian: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense ``[out, in]`` weight a loaded export computes with (same dtype as ``weight``)."""
    packed = pack_rtn(weight, mask, spec) if hessian is None else pack_gptq(weight, mask, hessian, spec)
    return packed.dense(spec, torch.float32).to(weight.dtype)


__all__ = [
    "EXPORT_OPTIONS", "HfSparseConfig", "PackedWeight", "QUANTIZATION_METHODS", "QuantizationMethod", "fake_quantize_weight", "get_quantization_method",
    "pack_gptq", "pack_rtn", "quantize_groups", "register_quantization_method",
]
