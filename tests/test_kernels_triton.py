"""The W4A16 x 2:4 Triton kernel against the dense dequantized reference.

On CPU the kernel runs in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1 when there is no
CUDA, before transformers imports triton. Shapes stay small because the interpreter is numpy-speed. The reference is built independently with hf_sparse.sparsity's
compress_nm / decompress_nm / pack_bits, exactly as the export format stores a 2:4 int4 linear.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from hf_sparse.kernels.triton_w4a16_nm import (  # noqa: E402
    KernelConfig,
    candidate_configs,
    default_config,
    dequantize_w4_nm24,
    w4a16_nm24_matmul,
)
from hf_sparse.sparsity import compress_nm, decompress_nm, nm_mask, pack_bits  # noqa: E402


def make_packed(n_out: int, k: int, group_size: int, asym: bool, seed: int, scale_dtype=torch.float16):
    """Random 2:4 int4 weight in the export layout plus its dense fp32 reference (built independently)."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(n_out, k, generator=g)
    mask = nm_mask(dense.abs(), 2, 4, dim=1)
    _, positions = compress_nm(dense, mask, 2, 4)  # [out, k/2] in-group positions, input order
    codes = torch.randint(0, 16, (n_out, k // 2), generator=g, dtype=torch.uint8)
    n_groups = -(-k // group_size)  # the last group may be short
    scales = (torch.rand(n_out, n_groups, generator=g) * 0.05 + 0.01).to(scale_dtype)
    zeros = (torch.rand(n_out, n_groups, generator=g) * 15).to(scale_dtype) if asym else None
    per_kept = lambda t: t.float().repeat_interleave(group_size // 2, dim=1)[:, : k // 2]  # noqa: E731
    zero = per_kept(zeros) if asym else 8.0
    reference = decompress_nm((codes.float() - zero) * per_kept(scales), positions, 2, 4)
    packed = dict(values=pack_bits(codes, 4), positions=pack_bits(positions, 2), scales=scales, zeros=zeros)
    return packed, reference


CASES = [
    # (M, out, in, group_size, asym, dtype, config)
    (1, 64, 256, 128, False, torch.float32, KernelConfig(1, 32, 64, 1)),
    (1, 48, 128, 128, True, torch.float16, KernelConfig(1, 16, 32, 4)),  # out not a multiple of BLOCK_N
    (3, 32, 128, 32, False, torch.float16, KernelConfig(4, 16, 64, 2)),  # groups smaller than the tile
    (2, 32, 192, 128, True, torch.float32, KernelConfig(4, 16, 64, 1)),  # short last group (192 = 128 + 64)
    (1, 16, 192, 128, False, torch.float32, KernelConfig(1, 16, 64, 1)),  # like SmolLM2's 576 at group 128
    (16, 64, 256, 64, True, torch.float32, KernelConfig(16, 32, 64, 1)),  # tl.dot path
    (20, 32, 256, 256, False, torch.float16, KernelConfig(16, 16, 128, 2)),  # per-channel, M masked, split-K
    (2, 32, 192, 192, False, torch.bfloat16, None),  # default config, in = 3 * 64
]


needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU run of the kernel needs TRITON_INTERPRET=1"
)


@needs_interpreter
@pytest.mark.parametrize("m,n_out,k,group_size,asym,dtype,cfg", CASES)
def test_kernel_matches_dense_dequantized_reference(m, n_out, k, group_size, asym, dtype, cfg):
    packed, w_ref = make_packed(n_out, k, group_size, asym, seed=m * 1000 + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    bias = torch.randn(n_out).to(dtype) if m % 2 == 0 else None
    y = w4a16_nm24_matmul(x, **packed, bias=bias, group_size=group_size, config=cfg)
    assert y.shape == (m, n_out) and y.dtype == dtype
    # reference: dequantized weight rounded to the activation dtype, math in fp32
    ref = x.float() @ w_ref.to(dtype).float().T
    if bias is not None:
        ref = ref + bias.float()
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    scale = ref.abs().max().item()
    assert (y.float() - ref).abs().max().item() <= tol * max(scale, 1.0)


@needs_interpreter
def test_leading_dims_and_torch_dequant_agree():
    packed, w_ref = make_packed(32, 128, 64, False, seed=7)
    assert torch.allclose(dequantize_w4_nm24(**packed, group_size=64), w_ref)
    x = torch.randn(2, 3, 128)
    y = w4a16_nm24_matmul(x, **packed, group_size=64, config=KernelConfig(8, 32, 32, 1))
    assert y.shape == (2, 3, 32)
    torch.testing.assert_close(y, x @ w_ref.T, rtol=1e-4, atol=1e-4)


def test_kernel_rejects_mismatched_storage():
    packed, _ = make_packed(32, 128, 64, False, seed=1)
    x = torch.randn(1, 128)
    with pytest.raises(ValueError, match="values shape"):
        w4a16_nm24_matmul(x, **{**packed, "values": packed["values"][:, :-1]}, group_size=64)
    with pytest.raises(ValueError, match="scales shape"):
        w4a16_nm24_matmul(x, **packed, group_size=32)
    with pytest.raises(ValueError, match="uint8"):
        w4a16_nm24_matmul(x, **{**packed, "positions": packed["positions"].to(torch.int32)}, group_size=64)
    with pytest.raises(ValueError, match="block_k"):
        w4a16_nm24_matmul(x, **packed, group_size=64, config=KernelConfig(1, 16, 256, 1))


def test_default_and_candidate_configs_are_valid_for_llama_shapes():
    for m in (1, 4, 16, 128, 2048):
        for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
            cfgs = candidate_configs(m, n, k, sm_count=132)
            assert cfgs[0] == default_config(m, n, k, sm_count=132) and len(set(cfgs)) == len(cfgs) <= 8
            for cfg in cfgs:
                assert k % cfg.block_k == 0 and cfg.block_k >= 16 and cfg.block_k & (cfg.block_k - 1) == 0
                assert (cfg.block_m >= 16) == cfg.use_dot
                assert 1 <= cfg.split_k <= k // cfg.block_k


@needs_interpreter
@pytest.mark.parametrize("m", [1, 3, 16])
def test_every_candidate_config_computes_the_same(m):
    packed, w_ref = make_packed(32, 128, 64, True, seed=m)
    x = torch.randn(m, 128)
    for cfg in candidate_configs(m, 32, 128, sm_count=4):
        y = w4a16_nm24_matmul(x, **packed, group_size=64, config=cfg)
        torch.testing.assert_close(y, x @ w_ref.T, rtol=1e-4, atol=1e-4, msg=lambda e, cfg=cfg: f"{cfg}: {e}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA (and TRITON_INTERPRET unset: the tests set it only where there is no GPU)")
@pytest.mark.parametrize("m", [1, 16, 128])
def test_kernel_on_gpu_llama_shape(m):
    packed, w_ref = make_packed(4096, 4096, 128, False, seed=m)
    packed = {k: (v.cuda() if v is not None else None) for k, v in packed.items()}
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    y = w4a16_nm24_matmul(x, **packed, group_size=128)
    ref = x.float() @ w_ref.cuda().half().float().T
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def _random_cases(count: int, seed: int = 2024):
    import random

    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        k = 64 * rng.randint(1, 6)
        group = rng.choice([g for g in (16, 32, 64, 128, k) if k % g == 0])
        bm = rng.choice([1, 2, 4, 16])
        bk = rng.choice([b for b in (16, 32, 64) if k % b == 0])
        cfg = KernelConfig(bm, rng.choice([16, 32]), bk, rng.choice([1, 2, 3]))
        m = rng.randint(1, 2 * bm)
        cases.append((m, 16 * rng.randint(1, 5), k, group, rng.random() < 0.5, cfg))
    return cases


@needs_interpreter
@pytest.mark.parametrize("m,n_out,k,group_size,asym,cfg", _random_cases(6))
def test_kernel_random_shapes_and_groups(m, n_out, k, group_size, asym, cfg):
    packed, w_ref = make_packed(n_out, k, group_size, asym, seed=n_out + k + m)
    x = torch.randn(m, k, dtype=torch.float32)
    y = w4a16_nm24_matmul(x, **packed, group_size=group_size, config=cfg)
    torch.testing.assert_close(y, x @ w_ref.T, rtol=1e-4, atol=1e-4)
