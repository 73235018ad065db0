"""W4A16 x 2:4 Triton kernel: ``y = x @ dequant(W)^T`` straight from the exported packed storage.

Why: at decode-sized M a linear layer is memory bound. Reading the 2:4 kept values as int4 plus 2-bit
positions moves ~3 bits per logical weight instead of 16, so the kernel can beat fp16 dense by ~4x in
bytes. No other maintained kernel reads this layout (Sparse-Marlin left torchao), hence our own.

Storage consumed (hf_sparse export format, N:M = 2:4 along the input dim, logical weight ``[out, in]``):

- ``values``    uint8 ``[out, in/4]``: two 4-bit codes per byte, low nibble = even kept index. At 2:4 one
  byte holds exactly the two kept values of one group of four input channels.
- ``positions`` uint8 ``[out, in/8]``: ``pack_bits(positions, 2)``, four 2-bit in-group positions per byte,
  lowest bits first, so one byte covers two groups (8 input channels).
- ``scales``    ``[out, ceil(in/group_size)]``, ``group_size`` counting *original* input channels (last group may be short).
- ``zeros``     optional float ``[out, in/group_size]``; absent = symmetric, implicit zero point 8.

``w = (code - zero) * scale`` at the kept position, 0 elsewhere.

Each program dequantizes a ``[BLOCK_N, BLOCK_K]`` dense tile in registers from the packed bytes (the
bytes are broadcast to the 4/8 dense columns they cover) and either feeds ``tl.dot`` (M >= 16) or
does a broadcast-multiply-reduce GEMV (M tiny, no padding of M to 16). Split-K spreads decode-sized
problems over the SMs with fp32 atomics. With ``TRITON_INTERPRET=1`` (set before triton is
first imported) the same source runs on CPU tensors in Triton's interpreter: that is how CI checks it
against the dense reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:  # triton is an optional dependency (extras "gpu" / "dev")
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "KernelConfig",
    "default_config",
    "candidate_configs",
    "w4a16_nm24_matmul",
    "dequantize_w4_nm24",
]

SYMMETRIC_ZERO = 8.0


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters; BLOCK_K must be a power of two >= 16 dividing ``in``."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    @property
    def use_dot(self) -> bool:
        return self.block_m >= 16

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages")}

    @classmethod
    def from_dict(cls, data: dict) -> "KernelConfig":
        return cls(**{k: int(v) for k, v in data.items() if k in cls.__dataclass_fields__})


def _kernel_source(
    x_ptr, vals_ptr, pos_ptr, scales_ptr, zeros_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_vn, stride_pn, stride_sn, stride_zn, stride_ym, stride_yn,
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K)  # dense input column inside the tile
    offs_vb = tl.arange(0, BLOCK_K // 4)  # value byte inside the tile (one byte per group of 4)
    offs_pb = tl.arange(0, BLOCK_K // 8)  # position byte inside the tile (one byte per 2 groups)
    mask_m = offs_m < M
    mask_n = offs_n < N

    in_group = offs_j % 4  # which of the 4 slots of its group this dense column is
    pos_shift = ((offs_j // 4) % 2) * 4  # bit offset of the group's two positions inside its byte

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_tiles = K // BLOCK_K
    for kt in range(pid_k, k_tiles, SPLIT_K):
        k0 = kt * BLOCK_K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_j)[None, :] * stride_xk,
            mask=mask_m[:, None],
            other=0.0,
        )
        vb = tl.load(vals_ptr + offs_n[:, None] * stride_vn + (k0 // 4 + offs_vb)[None, :], mask=mask_n[:, None], other=0)
        pb = tl.load(pos_ptr + offs_n[:, None] * stride_pn + (k0 // 8 + offs_pb)[None, :], mask=mask_n[:, None], other=0)
        # spread each packed byte over the dense columns it describes
        vb = tl.reshape(tl.broadcast_to(vb.to(tl.int32)[:, :, None], (BLOCK_N, BLOCK_K // 4, 4)), (BLOCK_N, BLOCK_K))
        pb = tl.reshape(tl.broadcast_to(pb.to(tl.int32)[:, :, None], (BLOCK_N, BLOCK_K // 8, 8)), (BLOCK_N, BLOCK_K))
        p0 = (pb >> pos_shift[None, :]) & 3
        p1 = (pb >> (pos_shift[None, :] + 2)) & 3
        hit0 = p0 == in_group[None, :]
        hit1 = p1 == in_group[None, :]
        code = tl.where(hit0, vb & 15, (vb >> 4) & 15).to(tl.float32)

        if GROUP_SIZE % BLOCK_K == 0:  # one scale (and zero) per row for the whole tile
            g = k0 // GROUP_SIZE
            s = tl.load(scales_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            if HAS_ZEROS:
                z = tl.load(zeros_ptr + offs_n * stride_zn + g, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            else:
                z = 8.0
        else:  # several groups inside the tile: gather per column (cache hits)
            g2 = ((k0 + offs_j) // GROUP_SIZE)[None, :]
            s = tl.load(scales_ptr + offs_n[:, None] * stride_sn + g2, mask=mask_n[:, None], other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(zeros_ptr + offs_n[:, None] * stride_zn + g2, mask=mask_n[:, None], other=0.0).to(tl.float32)
            else:
                z = 8.0
        w = tl.where(hit0 | hit1, (code - z) * s, 0.0)  # [BLOCK_N, BLOCK_K] fp32

        if USE_DOT:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        else:
            # dequantized weights are rounded to the activation dtype like the dense reference
            wq = w.to(x.dtype).to(tl.float32)
            acc += tl.sum(x.to(tl.float32)[:, None, :] * wq[None, :, :], axis=2)

    if HAS_BIAS:
        if pid_k == 0:
            b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += b[None, :]

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=out_mask)


_COMPILED: list = []


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else os.environ.get("TRITON_INTERPRET") == "1"


def _kernel():
    """The kernel, jitted once on first use (``triton.jit`` gives the interpreter under TRITON_INTERPRET=1)."""
    if not _COMPILED:
        _COMPILED.append(triton.jit(_kernel_source))
    return _COMPILED[0]


def _check_inputs(x: torch.Tensor, values, positions, scales, zeros, bias, group_size: int) -> tuple[int, int]:
    if values.dtype != torch.uint8 or positions.dtype != torch.uint8:
        raise ValueError(f"w4a16_nm24_matmul: values/positions must be uint8, got {values.dtype}/{positions.dtype}")
    if values.dim() != 2 or positions.dim() != 2 or scales.dim() != 2:
        raise ValueError("w4a16_nm24_matmul: values, positions and scales must be 2-D [out, ...]")
    n_out = values.shape[0]
    k = x.shape[-1]
    if k % 16:
        raise ValueError(f"w4a16_nm24_matmul: input features {k} must be a multiple of 16")
    if tuple(values.shape) != (n_out, k // 4):
        raise ValueError(f"w4a16_nm24_matmul: values shape {tuple(values.shape)} != [out, in/4] = {(n_out, k // 4)}")
    if tuple(positions.shape) != (n_out, k // 8):
        raise ValueError(f"w4a16_nm24_matmul: positions shape {tuple(positions.shape)} != [out, in/8] = {(n_out, k // 8)}")
    if group_size <= 0 or group_size % 4:
        raise ValueError(f"w4a16_nm24_matmul: group_size {group_size} must be a positive multiple of 4")
    n_groups = -(-k // group_size)  # the export format allows a shorter last group (e.g. 576 = 4*128 + 64)
    if tuple(scales.shape) != (n_out, n_groups):
        raise ValueError(f"w4a16_nm24_matmul: scales shape {tuple(scales.shape)} != {(n_out, n_groups)}")
    if zeros is not None and tuple(zeros.shape) != tuple(scales.shape):
        raise ValueError(f"w4a16_nm24_matmul: zeros shape {tuple(zeros.shape)} != scales shape {tuple(scales.shape)}")
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"w4a16_nm24_matmul: bias shape {tuple(bias.shape)} != ({n_out},)")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"w4a16_nm24_matmul: activations must be fp16/bf16/fp32, got {x.dtype}")
    return n_out, k


def _pow2_at_least(v: int, lo: int, hi: int) -> int:
    p = lo
    while p < v and p < hi:
        p *= 2
    return p


def _largest_block_k(k: int, cap: int) -> int:
    bk = cap
    while bk > 16 and k % bk:
        bk //= 2
    return bk


def default_config(m: int, n: int, k: int, sm_count: int | None = None) -> KernelConfig:
    """A sane launch for (M, N, K) when nothing was measured.

    Decode-sized M: GEMV tiles (no tl.dot, no padding of M to 16), the widest BLOCK_N that still gives
    ~2 programs per SM, split-K only when the output alone cannot fill the GPU (split-K costs a memset
    and a cast, i.e. two extra launches, which matter at ~2-5 us per layer). Larger M: tl.dot tiles.
    """
    sms = sm_count or 132
    if m <= 8:
        bm = _pow2_at_least(m, 1, 8)
        bk = _largest_block_k(k, 128 if m == 1 else 32)  # keep BLOCK_M*BLOCK_N*BLOCK_K in registers
        bn = 64 if m == 1 else 32
        while bn > 16 and -(-n // bn) < 2 * sms:
            bn //= 2
    else:
        bm = _pow2_at_least(m, 16, 64)
        bn, bk = 64, _largest_block_k(k, 64)
    tiles = -(-m // bm) * -(-n // bn)
    k_tiles = k // bk
    split = 1
    while tiles * split < sms and split * 2 <= k_tiles and split < 16:
        split *= 2
    return KernelConfig(bm, bn, bk, split)


def candidate_configs(m: int, n: int, k: int, sm_count: int | None = None) -> list[KernelConfig]:
    """The few launches measured on a GPU (short: this runs at load time); the default comes first."""
    base = default_config(m, n, k, sm_count)
    out = [base]
    bns = (16, 32, 64) if m <= 8 else (64, 128)
    for bn in bns:
        for split in (1, 2, 4):
            cfg = KernelConfig(base.block_m, bn, base.block_k, split, 4 if bn * base.block_k <= 8192 else 8)
            if cfg not in out and (k // cfg.block_k) >= split:
                out.append(cfg)
    if m > 8 and base.block_m < 64:
        out.append(KernelConfig(base.block_m * 2, 64, base.block_k, 1, 4))
    out = out[:7]
    if 1 < m <= 8:  # M padded to 16 for tl.dot can beat the broadcast-reduce GEMV
        out.append(KernelConfig(16, 64, _largest_block_k(k, 64), 1, 4))
    return out


def w4a16_nm24_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    group_size: int,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """``x @ dequant(W)^T (+ bias)`` for a 2:4 int4 weight in hf_sparse's packed layout.

    ``x`` is ``[..., in]`` (fp16/bf16/fp32); returns ``[..., out]`` in ``x.dtype``. CPU tensors run in
    Triton's interpreter (slow, for correctness checks only).
    """
    if not HAS_TRITON:
        raise RuntimeError("w4a16_nm24_matmul needs triton: pip install 'hf-sparse[gpu]'")
    n_out, k = _check_inputs(x, values, positions, scales, zeros, bias, group_size)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    cfg = config or default_config(m, n_out, k, _sm_count(x.device))
    if k % cfg.block_k or cfg.block_k < 16 or cfg.block_k & (cfg.block_k - 1):
        raise ValueError(f"w4a16_nm24_matmul: block_k {cfg.block_k} must be a power of two >= 16 dividing {k}")
    values, positions, scales = values.contiguous(), positions.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    if cfg.split_k > 1:
        y = torch.zeros(m, n_out, device=x.device, dtype=torch.float32)
    else:
        y = torch.empty(m, n_out, device=x.device, dtype=x.dtype)
    if m == 0:
        return y.to(x.dtype).reshape(*lead, n_out)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n_out, cfg.block_n), cfg.split_k)
    interpret = _interpreting()
    if x.device.type == "cpu" and not interpret:
        raise RuntimeError(
            "w4a16_nm24_matmul on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
            "anything imports triton (transformers does), e.g. in the environment of the process"
        )
    extra = {} if interpret else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    _kernel()[grid](
        x2, values, positions, scales,
        zeros if zeros is not None else scales,
        bias if bias is not None else scales,
        y,
        m, n_out, k,
        x2.stride(0), x2.stride(1), values.stride(0), positions.stride(0), scales.stride(0),
        zeros.stride(0) if zeros is not None else 0, y.stride(0), y.stride(1),
        GROUP_SIZE=group_size,
        HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k,
        USE_DOT=cfg.use_dot,
        **extra,
    )
    return y.to(x.dtype).reshape(*lead, n_out)


def _sm_count(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


def dequantize_w4_nm24(
    values: torch.Tensor,
    positions: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense ``[out, in]`` weight from the packed layout in plain torch (the reference and CPU fallback)."""
    from hf_sparse.sparsity import decompress_nm, unpack_bits

    n_out = values.shape[0]
    codes = unpack_bits(values, 4).to(torch.float32)  # [out, in/2] kept codes in input order
    pos = unpack_bits(positions, 2)  # [out, in/2]
    k = codes.shape[1] * 2
    kept_cols = codes.shape[1]  # a shorter last group: trim the repeated scales to the kept columns
    s = scales.to(torch.float32).repeat_interleave(group_size // 2, dim=1)[:, :kept_cols]
    z = SYMMETRIC_ZERO if zeros is None else zeros.to(torch.float32).repeat_interleave(group_size // 2, dim=1)[:, :kept_cols]
    kept = (codes - z) * s
    dense = decompress_nm(kept, pos, 2, 4)
    assert dense.shape == (n_out, k)
    return dense.to(dtype)
