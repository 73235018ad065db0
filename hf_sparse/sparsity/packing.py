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

__all__ = ["position_bits", "compress_nm", "decompress_nm", "pack_bits", "unpack_bits", "scatter_nm"]


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
    return scatter_nm(values, positions, n, m)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack small unsigned codes (last dim divisible by 8//bits) into uint8, lowest bits first."""
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"last dimension {codes.shape[-1]} is not divisible by {per_byte} codes per byte")
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`, returning uint8 codes.

    uint8 input is unpacked in uint8 (one shift and mask per code slot, no int32 copy: 4x less memory traffic;
    at 5632x2048 the int32 version was ~50 ms of a prefill call that re-dequantizes its weight).
    """
    if packed.dtype != torch.uint8:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.int32)
        codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*packed.shape[:-1], -1).to(torch.uint8)
    if bits == 8:
        return packed.clone()
    mask = (1 << bits) - 1
    parts = [packed & mask] + [(packed >> s) & mask for s in range(bits, 8 - bits, bits)] + [packed >> (8 - bits)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)


#: kept values per chunk of :func:`scatter_nm` (bounds its int64 temporaries to ~8 MB each)
SCATTER_CHUNK = 1 << 20
_UINT_VIEW = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32}


def scatter_nm(values: torch.Tensor, positions: torch.Tensor, n: int, m: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense ``[rows, kept*m/n]`` matrix with ``values`` at their in-group ``positions`` (uint8 codes), 0 elsewhere.

    Bit-exact with ``zeros(...).scatter_(-1, positions.long(), values)`` for valid (distinct) positions. Why not that:
    ``scatter_`` with an int64 index cost ~130 ms at 5632x2048. Instead every group of M dense elements is built
    as whole 64-bit words: each kept value's bit pattern, zero-extended, shifted to its slot (positions * element
    bits) and OR-ed in (disjoint bits). torch defines shifts that are negative or of 64 or more as 0, which drops
    values that belong to another word of the group. Other dtypes/layouts take the ``scatter_`` path. ``out`` (optional): a
    contiguous ``[rows, kept*m/n]`` tensor of ``values.dtype`` to write into.
    """
    rows, kept = values.shape
    groups = kept // n
    esize = values.element_size()
    words = m * esize // 8
    if out is None:
        out = torch.empty(rows, groups * m, dtype=values.dtype, device=values.device)
    if esize not in _UINT_VIEW or (m * esize) % 8 or values.device.type != "cpu" or positions.shape != values.shape:
        dense = torch.zeros(rows, groups, m, dtype=values.dtype, device=values.device)
        dense.scatter_(-1, positions.reshape(rows, groups, n).long(), values.reshape(rows, groups, n))
        return out.copy_(dense.reshape(rows, groups * m))
    result = out
    out = out.view(torch.int64).view(rows, groups, words)
    bits = 8 * esize
    step = max(1, SCATTER_CHUNK // max(1, kept))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        u = values[r0:r1].contiguous().view(_UINT_VIEW[esize]).to(torch.int64).view(r1 - r0, groups, n)
        offset = positions[r0:r1].to(torch.int64).view(r1 - r0, groups, n) * bits  # bit offset inside the group
        for k in range(words):
            shift = offset if k == 0 else offset - 64 * k  # negative: a slot of an earlier word, shifted to 0
            word = u[..., 0] << shift[..., 0]
            for i in range(1, n):
                word |= u[..., i] << shift[..., i]
            out[r0:r1, :, k] = word
    return result
