"""Compress an N:M sparse matrix into kept values plus bit-packed in-group positions.

Layout (row-major, input dimension last): for a ``[rows, cols]`` weight with an N:M mask, ``values``
is ``[rows, cols*N/M]`` (the kept entries in input order) and ``positions`` is ``[rows, cols*N/M]``
small integers in ``[0, M)``, packed ``8 // bits`` per byte with ``bits = ceil(log2 M)`` (2 bits for 2:4),
lowest bits first. This is the same metadata idea the GPU 2:4 kernels use, kept simple and portable.
"""

from __future__ import annotations

import math

import torch

from .nm import nm_violations

__all__ = ["position_bits", "compress_nm", "decompress_nm", "pack_bits", "unpack_bits"]


def position_bits(m: int) -> int:
    """Bits needed for an in-group position; rounded up to 1, 2, 4 or 8 so codes never straddle bytes."""
    bits = max(1, math.ceil(math.log2(m)))
    for allowed in (1, 2, 4, 8):
        if bits <= allowed:
            return allowed
    raise ValueError(f"m={m} is too large for byte-packed positions (max 256)")


def compress_nm(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (values, positions) for a 2-D ``weight`` whose bool ``mask`` is exactly N:M along dim 1."""
    if weight.dim() != 2 or mask.shape != weight.shape:
        raise ValueError(f"compress_nm needs a 2-D weight and a mask of the same shape, got {tuple(weight.shape)}")
    groups = mask.reshape(mask.shape[0], -1, m)
    if nm_violations(mask, n, m) or not bool((groups.sum(-1) == n).all()):
        raise ValueError(f"mask is not exactly {n}:{m} along the input dimension")
    # positions of the N True entries of every group, in increasing order
    order = torch.arange(m, device=mask.device).expand_as(groups)
    pos = torch.where(groups, order, m).sort(dim=-1).values[..., :n]
    vals = weight.reshape(weight.shape[0], -1, m).gather(-1, pos)
    return vals.reshape(weight.shape[0], -1).contiguous(), pos.reshape(weight.shape[0], -1).to(torch.uint8)


def decompress_nm(values: torch.Tensor, positions: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Inverse of :func:`compress_nm`: the dense ``[rows, cols]`` matrix with zeros at pruned places."""
    rows, kept = values.shape
    dense = torch.zeros(rows, kept // n, m, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, positions.reshape(rows, -1, n).long(), values.reshape(rows, -1, n))
    return dense.reshape(rows, -1)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack small unsigned codes (last dim divisible by 8//bits) into uint8, lowest bits first."""
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"last dimension {codes.shape[-1]} is not divisible by {per_byte} codes per byte")
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`, returning uint8 codes."""
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.int32)
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1).to(torch.uint8)
