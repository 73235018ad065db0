"""GPTQ (Frantar et al. 2022) under a fixed N:M mask: kept weights quantized, rounding error spread with H^-1."""

from __future__ import annotations

import torch

from ..format import NMSpec, dtype_from_name, pack_codes
from ..linalg import damped_inverse_cholesky
from ..sparsity.packing import compress_nm, pack_bits
from .rtn import PackedWeight, codes_for, pack_rtn, scale_zero

__all__ = ["pack_gptq"]


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
    Hinv = damped_inverse_cholesky(hessian, damp, what="GPTQ Hessian")
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
                scale, zero = scale_zero(kept, spec)
                scales.append(scale)
                if zero is not None:
                    zeros.append(zero)
            w = W1[:, i]
            q = (codes_for(w, scale, zero, spec) - (zero if zero is not None else 2 ** (spec.bits - 1))) * scale
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
    codes = codes_for(vals, expand(scale_t), None if zero_t is None else expand(zero_t), spec)
    return PackedWeight(
        pack_codes(codes.to(torch.uint8), spec.bits).contiguous(),
        pack_bits(pos, spec.pos_bits),
        scale_t.to(sdtype),
        None if zero_t is None else zero_t.to(sdtype),
    )
