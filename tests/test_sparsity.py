"""N:M mask math: exact patterns over random shapes and N:M, packing round trips, validation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_sparse.sparsity import (
    activation_scaled_score,
    compress_nm,
    decompress_nm,
    is_nm_sparse,
    nm_mask,
    pack_bits,
    position_bits,
    unpack_bits,
    validate_nm,
)

NM = st.sampled_from([(1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (1, 2), (3, 16)])


@settings(max_examples=60, deadline=None)
@given(nm=NM, rows=st.integers(1, 9), groups=st.integers(1, 7), dim=st.sampled_from([0, 1]), seed=st.integers(0, 2**16))
def test_mask_is_exactly_nm_along_dim(nm, rows, groups, dim, seed):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    shape = [rows, groups * m] if dim == 1 else [groups * m, rows]
    score = torch.randn(shape, generator=g)
    mask = nm_mask(score, n, m, dim=dim)
    assert mask.dtype == torch.bool and mask.shape == score.shape
    per_group = mask.movedim(dim, -1).reshape(-1, m).sum(-1)
    assert bool((per_group == n).all())
    # the kept entries are the top-n scores of their group
    grouped = score.movedim(dim, -1).reshape(-1, m)
    kept = grouped.masked_fill(~mask.movedim(dim, -1).reshape(-1, m), float("inf")).min(-1).values
    dropped = grouped.masked_fill(mask.movedim(dim, -1).reshape(-1, m), float("-inf")).max(-1).values
    assert bool((kept >= dropped).all())
    assert is_nm_sparse(score * mask, n, m, dim=dim)


def test_validation_names_argument():
    with pytest.raises(ValueError, match="`n`"):
        validate_nm(4, 4, module_name="layer.q")
    with pytest.raises(ValueError, match="layer.q.*`m`"):
        validate_nm(2, 4, in_features=10, module_name="layer.q")


@settings(max_examples=30, deadline=None)
@given(nm=NM, rows=st.integers(1, 6), groups=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_compress_round_trip(nm, rows, groups, seed):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * m, generator=g)
    mask = nm_mask(w.abs(), n, m)
    vals, pos = compress_nm(w, mask, n, m)
    assert vals.shape == (rows, groups * n)
    assert torch.equal(decompress_nm(vals, pos, n, m), w * mask)
    bits = position_bits(m)
    codes = pos.reshape(rows, -1)
    pad = (-codes.shape[1]) % (8 // bits)
    codes = torch.nn.functional.pad(codes, (0, pad))
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits), codes)


def test_compress_rejects_non_nm_mask():
    w = torch.randn(2, 8)
    with pytest.raises(ValueError, match="exactly 2:4"):
        compress_nm(w, torch.ones_like(w, dtype=torch.bool), 2, 4)


def test_activation_scaled_score_changes_choice():
    w = torch.tensor([[1.0, 0.9, 0.5, 0.4]])
    norms = torch.tensor([0.1, 0.1, 10.0, 10.0])
    assert nm_mask(w.abs(), 2, 4).tolist() == [[True, True, False, False]]
    assert nm_mask(activation_scaled_score(w, norms), 2, 4).tolist() == [[False, False, True, True]]
