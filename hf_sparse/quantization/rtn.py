"""Round-to-nearest quantization of the kept weights of an N:M matrix, and the packed result type.

Only kept weights are quantized and stored; pruned ones are zeros that cost nothing. Scales (and zeros)
are rounded to their storage dtype *before* codes are chosen, so dequantizing the stored tensors gives
exactly the weights the in-memory fake-quantized model uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..sparsity.packing import compress_nm, pack_bits
from ..format import NMSpec, dtype_from_name, pack_codes, unpack_weight

__all__ = ["PackedWeight", "quantize_groups", "pack_rtn", "scale_zero", "codes_for"]


@dataclass
class PackedWeight:
    """The stored tensors of one linear (before naming): see :mod:`hf_sparse.format`."""

    values: torch.Tensor
    positions: torch.Tensor
    scales: Optional[torch.Tensor] = None
    zeros: Optional[torch.Tensor] = None

    def dense(self, spec: NMSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return unpack_weight(self.values, self.positions, self.scales, self.zeros, spec, dtype)


def scale_zero(group_vals: torch.Tensor, spec: NMSpec) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-group scale (and zero) from ``[..., k]`` values, rounded to the storage dtype."""
    sdtype = dtype_from_name(spec.scale_dtype)
    if spec.symmetric:
        qmax = 2 ** (spec.bits - 1) - 1
        amax = group_vals.abs().amax(-1)
        scale = (amax / qmax).to(sdtype).to(torch.float32)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, None
    # asymmetric: the range always holds 0 so an integer zero-point represents pruned zeros exactly (interop)
    qmax = 2**spec.bits - 1
    lo = group_vals.amin(-1).clamp(max=0)
    hi = group_vals.amax(-1).clamp(min=0)
    scale = ((hi - lo) / qmax).to(sdtype).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, qmax).to(sdtype).to(torch.float32)
    return scale, zero


def codes_for(vals: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], spec: NMSpec) -> torch.Tensor:
    """Unsigned integer codes of ``vals`` on the grid (symmetric: implicit zero-point ``2**(bits-1)``)."""
    z = zero if zero is not None else torch.full_like(scale, 2 ** (spec.bits - 1))
    return torch.clamp(torch.round(vals / scale + z), 0, 2**spec.bits - 1)


def quantize_groups(kept_vals: torch.Tensor, spec: NMSpec) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """RTN of kept values ``[out, kept]`` -> (uint8 codes [out, kept], scales [out, G], zeros [out, G] | None)."""
    rows, kept = kept_vals.shape
    per_group = kept if spec.group_size is None else spec.group_size * spec.n // spec.m
    groups = -(-kept // per_group)
    # a shorter last group is padded with zeros: they change neither |max| nor a range that always holds 0
    v = torch.nn.functional.pad(kept_vals.to(torch.float32), (0, groups * per_group - kept))
    v = v.reshape(rows, groups, per_group)
    scale, zero = scale_zero(v, spec)
    codes = codes_for(v, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1), spec)
    sdtype = dtype_from_name(spec.scale_dtype)
    return (
        codes.reshape(rows, groups * per_group)[:, :kept].to(torch.uint8),
        scale.to(sdtype),
        None if zero is None else zero.to(sdtype),
    )


def _finish(vals: torch.Tensor, pos: torch.Tensor, spec: NMSpec) -> PackedWeight:
    positions = pack_bits(pos, spec.pos_bits)
    if spec.bits == 16:
        return PackedWeight(vals.to(dtype_from_name(spec.values_dtype)).contiguous(), positions)
    codes, scales, zeros = quantize_groups(vals, spec)
    return PackedWeight(pack_codes(codes, spec.bits).contiguous(), positions, scales, zeros)


def pack_rtn(weight: torch.Tensor, mask: torch.Tensor, spec: NMSpec) -> PackedWeight:
    """Pack an ``[out, in]`` weight under its bool N:M ``mask`` with round-to-nearest quantization."""
    vals, pos = compress_nm(weight.detach().to(torch.float32), mask, spec.n, spec.m)
    return _finish(vals, pos, spec)
