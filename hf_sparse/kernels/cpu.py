"""CPU paths of the dispatch: torch's own weight-only low-bit kernels, so an export is smaller and faster on CPU too.

* ``"cpu_int4"``: 2:4 + int4 exports through ``aten._weight_int4pack_mm_for_cpu`` (tinygemm layout, converted once
  per module with ``_convert_weight_to_int4pack_for_cpu``). The kernel computes ``(q - 8)·scale + zero`` per group;
  pruned weights are stored as the code of an exact 0 (symmetric: 8, zero 0; asymmetric: our zero-point ``z``, float
  zero ``(8 - z)·scale``). 4 bits a weight instead of 32 for the memory-bound decode. Activations run in bf16
  (fp16/bf16 inputs in their own dtype): the kernel is slow in fp32.
* ``"cpu_int8"``: symmetric per-channel int8 exports through ``aten._weight_int8pack_mm`` (``codes - 128``; pruned
  weights are 0), bf16 activations likewise.
* ``"dense_lowp"``: bf16-stored 16-bit exports keep their dense weight in bf16 (half the fp32 copy) and compute in
  bf16, where the CPU does that natively.
* ``"dequant_bf16"``: int4/int8 exports run with float32/float16 activations, at prefill-sized M (>=
  :data:`DEQUANT_MIN_M` tokens) on CPUs with native bf16 (AVX512-BF16/AMX): dequantize the weight exactly to bf16 on
  every call (nothing kept) and multiply in bf16. At M=512 the bf16 GEMM runs ~2x the fp32 one, which pays for the
  dequantization (5632x2048, 1 thread: bf16 GEMM 84 ms + dequantize 37 ms; fp32 GEMM 280 ms; int4 kernel ~230 ms).
  With bf16 activations the dense path already is this computation.

None is exact in fp32: each is checked against the dense dequantized reference when the dispatch measures it, and it
runs only where it measured faster than dense (``HF_SPARSE_CPU_KERNELS=0`` turns these paths off). The converted
weights live in ``module._kernel_cache``; the dense fp32 copy is not kept where one of the :data:`RESIDENT` paths
(those holding a compact weight of their own) can run.

What a loaded 2:4 + int4 export holds on CPU (1.1B Llama-shaped, measured): the stored tensors (codes 0.25 B a weight,
positions 0.125, scales) and the dense rest (embeddings, lm_head, norms) stay in the safetensors file's mmap'd pages
(transformers loads them without a copy: ``RssFile``, ~640 MB); the tinygemm layout of ``cpu_int4`` (0.5 B a weight +
bf16 scale/zero, ~515 MB) is heap (``RssAnon``), beside the stored codes, which the dense path (prefill-sized M, where
it re-dequantizes per call) and ``dequantize()`` still need. Conversions and the dispatch's measurement allocate
per-layer temporaries only (dense int32 codes, one dequantized weight), freed and trimmed (:func:`release_freed_memory`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from ..format import unpack_codes, unpack_positions
from ..sparsity.packing import scatter_nm

__all__ = [
    "ENV_CPU_KERNELS", "INT4_GROUP_SIZES", "cpu_int4_forward", "cpu_int4_supported", "cpu_int8_forward",
    "cpu_int8_supported", "cpu_kernels_enabled", "SUPPORTED", "RESIDENT", "dense_lowp_forward", "dense_lowp_supported",
    "dequant_bf16_forward", "dequant_bf16_supported", "native_bf16",
]

ENV_CPU_KERNELS = "HF_SPARSE_CPU_KERNELS"
INT4_GROUP_SIZES = (32, 64, 128, 256)
#: below this many tokens a call cannot pay for re-dequantizing the whole weight: not offered (saves measuring it)
DEQUANT_MIN_M = 64
_NATIVE_BF16: list[bool] = []


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 GEMMs are emulated and slow."""
    if not _NATIVE_BF16:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        except OSError:
            flags = []
        _NATIVE_BF16.append(any(flag in flags for flag in ("avx512_bf16", "amx_bf16")))
    return _NATIVE_BF16[0]


def release_freed_memory() -> None:
    """Hand memory that freed temporaries left in the C heap back to the OS (glibc's ``malloc_trim``; no-op elsewhere).

    A conversion builds ``[out, in]`` int32/float temporaries (~12 bytes a weight); glibc keeps their pages, and a
    1B-parameter export's resident memory after its first forward measured 2.45 GB instead of 1.59 GB without this.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes
            import ctypes.util

            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def cpu_kernels_enabled() -> bool:
    return os.environ.get(ENV_CPU_KERNELS, "1") != "0"


def _usable(module: Any, x: torch.Tensor) -> bool:
    """CPU, forward only (the kernels have no autograd), float activations."""
    if x.device.type != "cpu" or not cpu_kernels_enabled():
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return x.dtype in (torch.float32, torch.bfloat16, torch.float16)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _int4_group_size(module: Any) -> int | None:
    spec = module.spec
    gs = spec.group_size if spec.group_size is not None else module.in_features
    return gs if gs in INT4_GROUP_SIZES and module.in_features % gs == 0 else None


def cpu_int4_supported(module: Any, x: torch.Tensor) -> bool:
    spec = module.spec
    if spec.bits != 4 or not _usable(module, x) or module.out_features % 16 or module.in_features % 2:
        return False
    return _int4_group_size(module) is not None and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def _dense_codes(module: Any, fill: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` int32 codes: kept codes at their positions, ``fill`` elsewhere (``[out, G]``, per group of
    ``group_size`` inputs: the code of an exact 0).

    Scatters ``code - fill`` (0 at pruned places) word-wise (:func:`hf_sparse.sparsity.packing.scatter_nm`) and adds
    the fill back per group: ~70 MB of temporaries for a 5632x2048 weight where an int64 ``scatter_`` with an
    ``[out, in]`` fill took ~200 MB (what the peak resident memory of a conversion is made of)."""
    spec = module.spec
    kept = spec.kept(module.in_features)
    rows, groups = module.out_features, fill.shape[1]
    fill = fill.to(torch.int32).unsqueeze(-1)
    codes = unpack_codes(module.nm_values, spec.bits)[:, :kept].to(torch.int32)
    relative = codes.view(rows, groups, -1).sub_(fill).view(rows, kept)
    dense = scatter_nm(relative, unpack_positions(module.nm_positions, spec, kept), spec.n, spec.m)
    del codes, relative
    dense.view(rows, groups, group_size).add_(fill)
    return dense


def _int4_operands(module: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    cache = module._kernel_cache
    key = ("cpu_int4", dtype)
    if cache.get("cpu_int4_key") != key:
        spec = module.spec
        gs = _int4_group_size(module)
        scales = module.nm_scales.to(torch.float32)  # [out, G]
        if spec.symmetric:
            zero_code = torch.full_like(scales, 8.0)
            zero_float = torch.zeros_like(scales)
        else:  # (q - z)·s == (q - 8)·s + (8 - z)·s
            zero_code = module.nm_zeros.to(torch.float32)
            zero_float = (8.0 - zero_code) * scales
        codes = _dense_codes(module, zero_code.round(), gs)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 8)
        scale_zero = torch.stack([scales.t(), zero_float.t()], dim=-1).to(dtype).contiguous()  # [G, out, 2]
        cache.pop("dense", None)
        cache.pop("dense_key", None)
        cache["cpu_int4"] = (packed, scale_zero, gs)
        cache["cpu_int4_key"] = key
        del codes
        release_freed_memory()
    return cache["cpu_int4"]


def cpu_int4_forward(module: Any, x: torch.Tensor) -> torch.Tensor:
    dtype = _compute_dtype(x)
    packed, scale_zero, gs = _int4_operands(module, dtype)
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), packed, gs, scale_zero)
    if module.bias is not None:
        out = out + module.bias.to(dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], module.out_features)


def cpu_int8_supported(module: Any, x: torch.Tensor) -> bool:
    spec = module.spec
    return (spec.bits == 8 and spec.symmetric and spec.group_size is None and _usable(module, x)
            and hasattr(torch.ops.aten, "_weight_int8pack_mm"))


def _int8_operands(module: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    cache = module._kernel_cache
    key = ("cpu_int8", dtype)
    if cache.get("cpu_int8_key") != key:
        fill = torch.full((module.out_features, 1), 128, dtype=torch.int32)
        weight = _dense_codes(module, fill, module.in_features).sub_(128).to(torch.int8).contiguous()
        scales = module.nm_scales.to(torch.float32).reshape(-1).to(dtype).contiguous()
        cache.pop("dense", None)
        cache.pop("dense_key", None)
        cache["cpu_int8"] = (weight, scales)
        cache["cpu_int8_key"] = key
        release_freed_memory()
    return cache["cpu_int8"]


def cpu_int8_forward(module: Any, x: torch.Tensor) -> torch.Tensor:
    dtype = _compute_dtype(x)
    weight, scales = _int8_operands(module, dtype)
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), weight, scales)
    if module.bias is not None:
        out = out + module.bias.to(dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], module.out_features)


def dense_lowp_supported(module: Any, x: torch.Tensor) -> bool:
    return module.spec.bits == 16 and module.spec.values_dtype == "bfloat16" and _usable(module, x)


def dense_lowp_forward(module: Any, x: torch.Tensor) -> torch.Tensor:
    cache = module._kernel_cache
    if cache.get("dense_lowp_key") != torch.bfloat16:
        cache.pop("dense", None)
        cache.pop("dense_key", None)
        cache["dense_lowp"] = module.dequantized_weight(torch.bfloat16)
        cache["dense_lowp_key"] = torch.bfloat16
    bias = None if module.bias is None else module.bias.to(torch.bfloat16)
    return F.linear(x.to(torch.bfloat16), cache["dense_lowp"], bias).to(x.dtype)


def dequant_bf16_supported(module: Any, x: torch.Tensor) -> bool:
    """For float32/float16 activations (with bf16 ones the dense path is this very computation)."""
    m = x.numel() // max(1, module.in_features)
    return (module.spec.bits in (4, 8) and x.dtype != torch.bfloat16 and m >= DEQUANT_MIN_M and _usable(module, x)
            and native_bf16())


def dequant_bf16_forward(module: Any, x: torch.Tensor) -> torch.Tensor:
    """``F.linear`` in bf16 on the exactly dequantized weight, rebuilt per call (the module docstring's why)."""
    dtype = torch.bfloat16
    weight = module.dequantized_weight(dtype)
    bias = None if module.bias is None else module.bias.to(dtype)
    return F.linear(x.to(dtype), weight, bias).to(x.dtype)


#: CPU path name -> support check, in the order they are offered to the measurement
SUPPORTED = {"cpu_int4": cpu_int4_supported, "cpu_int8": cpu_int8_supported, "dense_lowp": dense_lowp_supported,
             "dequant_bf16": dequant_bf16_supported}
#: the paths that hold a compact weight of their own (where one can run, the dense path keeps no fp32 copy)
RESIDENT = ("cpu_int4", "cpu_int8", "dense_lowp")
