"""The fast exact dequantization (uint8 unpacking, broadcast scales, word-wise N:M scatter) against the plain one.

The writer's fake quantization and the loader both go through :func:`hf_sparse.format.unpack_weight`, so it must give
the same bits as the formulation it replaced (int32 unpacking, ``repeat_interleave``, ``scatter_`` with an int64
index), kept here verbatim as the reference. Compared bit for bit (integer views: -0.0 and NaN payloads count).
"""

from __future__ import annotations

import itertools
from typing import Optional

import pytest
import torch

from hf_sparse import format as fmt
from hf_sparse.format import NMSpec, unpack_weight
from hf_sparse.quantization import pack_rtn
from hf_sparse.sparsity import nm_mask, packing
from hf_sparse.sparsity.packing import pack_bits, scatter_nm, unpack_bits


def old_unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.int32)
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1).to(torch.uint8)


def old_unpack_weight(values, positions, scales, zeros, spec: NMSpec, dtype: torch.dtype) -> torch.Tensor:
    if spec.bits == 16:
        deq = values.to(dtype)
    else:
        codes = (old_unpack_bits(values, 4) if spec.bits == 4 else values).to(torch.float32)
        kept = codes.shape[1]
        per_group = kept if spec.group_size is None else spec.group_size * spec.n // spec.m
        scale = scales.to(torch.float32).repeat_interleave(per_group, dim=1)[:, :kept]
        zero = float(2 ** (spec.bits - 1)) if zeros is None else \
            zeros.to(torch.float32).repeat_interleave(per_group, dim=1)[:, :kept]
        deq = ((codes - zero) * scale).to(dtype)
    rows, kept = deq.shape
    pos = old_unpack_bits(positions, spec.pos_bits)[:, :kept]
    dense = torch.zeros(rows, kept // spec.n, spec.m, dtype=dtype)
    dense.scatter_(-1, pos.reshape(rows, -1, spec.n).long(), deq.reshape(rows, -1, spec.n))
    return dense.reshape(rows, -1)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def packed(rows: int, cols: int, spec: NMSpec, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, : spec.m] = -0.0  # negative zeros among the kept values of 16-bit exports
    p = pack_rtn(w, nm_mask(w.abs() + 1e-3 * torch.rand(rows, cols, generator=g), spec.n, spec.m), spec)
    return p.values, p.positions, p.scales, p.zeros


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_unpack_bits_matches_the_int32_version(bits):
    g = torch.Generator().manual_seed(bits)
    packed_bytes = torch.randint(0, 256, (7, 24), generator=g, dtype=torch.uint8)
    got = unpack_bits(packed_bytes, bits)
    assert got.dtype == torch.uint8 and torch.equal(got, old_unpack_bits(packed_bytes, bits))
    codes = torch.randint(0, 1 << bits, (5, 48), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits), codes)
    assert torch.equal(unpack_bits(packed_bytes.to(torch.int32), bits), old_unpack_bits(packed_bytes, bits))


CONFIGS = [  # (n, m, rows, cols, bits, group_size, symmetric, values_dtype)
    *[(2, 4, r, c, b, gs, sym, "float16")
      for (r, c), b, gs, sym in itertools.product([(48, 576), (7, 192), (33, 256)], [4, 8], [None, 32, 128], [True, False])],
    (2, 4, 16, 512, 4, 256, True, "float16"),
    (2, 4, 9, 200, 8, 64, False, "float16"),  # 200 = 3 x 64 + 8: a short last group
    (2, 4, 12, 96, 16, None, True, "float16"),
    (2, 4, 12, 96, 16, None, True, "bfloat16"),
    (1, 4, 10, 256, 4, 64, True, "float16"),
    (1, 4, 10, 320, 8, 128, False, "float16"),  # 320 = 2 x 128 + 64
    (1, 4, 10, 96, 16, None, True, "bfloat16"),
    (2, 8, 6, 256, 4, 128, True, "float16"),
    (2, 8, 6, 320, 4, 128, False, "float16"),
    (2, 8, 6, 128, 16, None, True, "float16"),
]


@pytest.mark.parametrize("n, m, rows, cols, bits, group_size, symmetric, values_dtype", CONFIGS)
def test_unpack_weight_is_bit_exact_with_the_plain_formulation(n, m, rows, cols, bits, group_size, symmetric,
                                                              values_dtype, monkeypatch):
    spec = NMSpec(n=n, m=m, bits=bits, group_size=group_size, symmetric=symmetric, values_dtype=values_dtype)
    tensors = packed(rows, cols, spec, seed=rows * cols + bits)
    for chunk in (fmt.UNPACK_CHUNK, 64):  # several row chunks, and chunks of scatter_nm, too
        monkeypatch.setattr(fmt, "UNPACK_CHUNK", chunk)
        monkeypatch.setattr(packing, "SCATTER_CHUNK", chunk)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            got = unpack_weight(*tensors, spec, dtype)
            ref = old_unpack_weight(*tensors, spec, dtype)
            assert got.shape == (rows, cols) and got.dtype == dtype
            assert torch.equal(bits_of(got), bits_of(ref)), (dtype, chunk)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (2, 8), (3, 8), (1, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_scatter_nm_places_unsorted_values_like_scatter(n, m, dtype):
    """Any distinct positions (not only the increasing ones the writer stores), special values included."""
    g = torch.Generator().manual_seed(n * 10 + m)
    rows, groups = 5, 12
    pos = torch.stack([torch.randperm(m, generator=g)[:n] for _ in range(rows * groups)]).to(torch.uint8)
    pos = pos.reshape(rows, groups * n)
    values = torch.randn(rows, groups * n, generator=g).to(dtype)
    values[0, :4] = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf")]).to(dtype)
    ref = torch.zeros(rows, groups, m, dtype=dtype)
    ref.scatter_(-1, pos.reshape(rows, groups, n).long(), values.reshape(rows, groups, n))
    got = scatter_nm(values, pos, n, m)
    assert torch.equal(bits_of(got), bits_of(ref.reshape(rows, -1)))
    out = torch.full((rows, groups * m), 7.0, dtype=dtype)
    assert scatter_nm(values, pos, n, m, out=out) is out and torch.equal(bits_of(out), bits_of(ref.reshape(rows, -1)))


def test_expert_weights_unpack_like_their_linears():
    spec = NMSpec(bits=4, group_size=64, symmetric=False)
    parts = [packed(16, 192, spec, seed=s) for s in range(3)]
    stacked: list[Optional[torch.Tensor]] = [torch.stack([p[i] for p in parts]) for i in range(4)]
    got = fmt.unpack_expert_weight(*stacked, spec, torch.bfloat16)
    for e, p in enumerate(parts):
        assert torch.equal(bits_of(got[e]), bits_of(old_unpack_weight(*p, spec, torch.bfloat16)))
