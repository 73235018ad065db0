"""Quantize the kept weights of an N:M matrix: round-to-nearest, or GPTQ that respects the mask.

Only kept weights are quantized and stored; pruned ones are zeros that cost nothing. Scales (and zeros)
are rounded to their storage dtype *before* codes are chosen, so dequantizing the stored tensors gives
exactly the weights the in-memory fake-quantized model uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..sparsity.packing import compress_nm, pack_bits
from .format import NMSpec, dtype_from_name, pack_codes, unpack_weight

__all__ = ["PackedWeight", "quantize_groups", "pack_rtn", "pack_gptq", "fake_quantize_weight"]


@dataclass
class PackedWeight:
    """The stored tensors of one linear (before naming): see :mod:`hf_sparse.export.format`."""

    values: torch.Tensor
    positions: torch.Tensor
    scales: Optional[torch.Tensor] = None
    zeros: Optional[torch.Tensor] = None

    def dense(self, spec: NMSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return unpack_weight(self.values, self.positions, self.scales, self.zeros, spec, dtype)


def _scale_zero(group_vals: torch.Tensor, spec: NMSpec) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
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


def _codes(vals: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], spec: NMSpec) -> torch.Tensor:
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
    scale, zero = _scale_zero(v, spec)
    codes = _codes(v, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1), spec)
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


@torch.no_grad()
def pack_gptq(
    weight: torch.Tensor,
    mask: torch.Tensor,
    hessian: torch.Tensor,
    spec: NMSpec,
    damp: float = 0.01,
    block_size: int = 128,
) -> PackedWeight:
    """GPTQ (Frantar et al. 2022) under a fixed N:M mask, column by column as in SparseGPT: kept weights
    are rounded to the grid, pruned weights are "rounded" to exactly 0, and each column's error is spread
    over the later columns with the inverse Hessian. A pruned position can pick up a transient update, but
    it is zeroed when its column comes (its error passed on), so every final change lands on kept weights.

    ``hessian`` is ``X^T X`` over calibration inputs, ``[in, in]``. Group scales are fixed when the
    first column of a group is reached, from the already error-compensated kept weights.
    """
    if spec.bits == 16:
        return pack_rtn(weight, mask, spec)
    W = weight.detach().to(torch.float32).clone() * mask
    M = mask.to(torch.float32)
    rows, cols = W.shape
    H = hessian.to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.diag(H).mean() * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    gs = cols if spec.group_size is None else spec.group_size
    Q = torch.zeros_like(W)
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    scale = zero = None
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        W1, M1, Hinv1 = W[:, b0:b1].clone(), M[:, b0:b1], Hinv[b0:b1, b0:b1]
        Err1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            col = b0 + i
            if col % gs == 0:  # new group: scale from the current kept weights of the whole group
                group = torch.cat([W1[:, i:], W[:, b1:]], 1)[:, : gs] if col + gs > b1 else W1[:, i : i + gs]
                gmask = M[:, col : col + gs].bool()
                kept = group[gmask].reshape(rows, -1)
                scale, zero = _scale_zero(kept, spec)
                scales.append(scale)
                if zero is not None:
                    zeros.append(zero)
            w = W1[:, i]
            q = (_codes(w, scale, zero, spec) - (zero if zero is not None else 2 ** (spec.bits - 1))) * scale
            q = q * M1[:, i]
            Q[:, col] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    vals, pos = compress_nm(Q, mask, spec.n, spec.m)
    sdtype = dtype_from_name(spec.scale_dtype)
    scale_t = torch.stack(scales, 1)
    zero_t = torch.stack(zeros, 1) if zeros else None
    per_group = vals.shape[1] if spec.group_size is None else spec.group_size * spec.n // spec.m
    def expand(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(per_group, dim=1)[:, : vals.shape[1]]
    codes = _codes(vals, expand(scale_t), None if zero_t is None else expand(zero_t), spec)
    return PackedWeight(
        pack_codes(codes.to(torch.uint8), spec.bits).contiguous(),
        pack_bits(pos, spec.pos_bits),
        scale_t.to(sdtype),
        None if zero_t is None else zero_t.to(sdtype),
    )


def fake_quantize_weight(weight: torch.Tensor, mask: torch.Tensor, spec: NMSpec, hessian: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense ``[out, in]`` weight a loaded export computes with (same dtype as ``weight``)."""
    packed = pack_rtn(weight, mask, spec) if hessian is None else pack_gptq(weight, mask, hessian, spec)
    return packed.dense(spec, torch.float32).to(weight.dtype)
