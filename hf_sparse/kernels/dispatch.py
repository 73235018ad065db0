"""The one place that chooses how a packed N:M linear computes.

``choose_path(module, x) -> str`` returns the name of an entry of :data:`PATHS`; ``PATHS[name](module, x)``
computes ``y = x W^T + b`` (without the SLoRB branch, which the module adds). Paths today:

* ``"dense"``: dequantize the N:M weight exactly (zeros at pruned places) and call ``F.linear``. Works
  everywhere; the reference every other path is tested against.
* ``"semi_structured"``: ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt, or CUTLASS when forced)
  on CUDA sm80+, fp16/bf16 activations, 2:4, weight shape a multiple of the backend's minimum tile. The
  compressed weight is built once per module/device/dtype and cached (not persisted).
* ``"triton_w4a16"``: hf_sparse's Triton kernel reading the 2:4 int4 storage directly
  (:mod:`hf_sparse.kernels.triton_w4a16_nm`), for bits=4 2:4 exports; forward only (no autograd).

Choice: every supported path is a candidate, dense always among them. On CUDA,
:func:`hf_sparse.kernels.autotune.select_backend` measures them once per (GPU, shape, M bucket, dtype,
format) and caches the winner on disk, so the choice is never slower than dense. On CPU the dense path is
the default. Overrides: ``FORCE_PATH`` (tests/benchmarks), ``$HF_SPARSE_KERNEL`` (validated per module),
``$HF_SPARSE_AUTOTUNE=0`` (no measuring: dense unless cached).

To add a kernel: write ``def forward(module, x) -> Tensor``, register it in ``PATHS`` and its support
condition in :func:`candidate_paths`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from . import autotune, cpu


@runtime_checkable
class PackedNMLinear(Protocol):
    """What a path needs of a module (:class:`hf_sparse.modules.PackedNMLinear` is the implementation).

    Kernels know this interface only, never the module class: the layer order is kernels below modules.
    """

    spec: Any  # hf_sparse.format.NMSpec
    in_features: int
    out_features: int
    bias: Optional[torch.Tensor]
    nm_values: torch.Tensor
    nm_positions: torch.Tensor
    _kernel_cache: dict

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor: ...

__all__ = [
    "choose_path",
    "candidate_paths",
    "PATHS",
    "semi_structured_supported",
    "triton_w4a16_supported",
    "tune_model",
    "FORCE_PATH",
]

# tests and benchmarks may pin a path ("dense", "semi_structured", "triton_w4a16"); None = automatic choice
FORCE_PATH: str | None = None
# The dense fallback keeps its dequantized weight (speed: the dense path must match a dense
# model wherever it is chosen, e.g. 2:4 fp16 at decode), except where a low-bit CPU kernel can run the module
# (see _keep_dense_copy). HF_SPARSE_DENSE_CACHE=0 never keeps it (less memory, slower), =1 always.
ENV_DENSE_CACHE = "HF_SPARSE_DENSE_CACHE"


def _semi_structured_class() -> type:
    from torch.sparse import SparseSemiStructuredTensor

    if SparseSemiStructuredTensor._FORCE_CUTLASS or not torch.backends.cusparselt.is_available():
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def semi_structured_supported(out_features: int, in_features: int, n: int, m: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``to_sparse_semi_structured`` accepts a ``[out, in]`` 2:4 weight of ``dtype`` on ``device``."""
    if device.type != "cuda" or (n, m) != (2, 4) or dtype not in (torch.float16, torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False
    limits = _semi_structured_class()._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    if limits is None:
        return False
    rows, cols = limits.sparse_min_rows, limits.sparse_min_cols
    return out_features >= rows and out_features % rows == 0 and in_features >= cols and in_features % cols == 0


def triton_w4a16_supported(module: "PackedNMLinear", x: torch.Tensor) -> bool:
    """Whether the Triton int4 x 2:4 kernel can run ``module`` on ``x`` (CUDA, or CPU under the interpreter)."""
    spec = module.spec
    if (spec.n, spec.m) != (2, 4) or spec.bits != 4 or x.device.type not in ("cuda", "cpu"):
        return False
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or module.in_features % 16:
        return False
    if torch.is_grad_enabled() and x.requires_grad:  # forward-only kernel: keep autograd intact
        return False
    from .triton_w4a16_nm import HAS_TRITON, _interpreting  # imports triton: only once a module could use it

    return HAS_TRITON and (x.device.type == "cuda" or _interpreting())


def candidate_paths(module: "PackedNMLinear", x: torch.Tensor) -> list[str]:
    """Names of the paths that can compute ``module`` on ``x``; ``"dense"`` is always first."""
    names = ["dense"]
    if x.device.type == "cpu":
        names += [name for name, supported in cpu.SUPPORTED.items() if supported(module, x)]
    spec = module.spec
    if semi_structured_supported(module.out_features, module.in_features, spec.n, spec.m, x.dtype, x.device):
        names.append("semi_structured")
    if triton_w4a16_supported(module, x):
        names.append("triton_w4a16")
    return names


_DISK_CACHE: list[autotune.AutotuneCache] = []


def _disk_cache() -> autotune.AutotuneCache:
    """One cache object per process (its in-memory copy spares re-reading the file for every layer)."""
    path = autotune.default_cache_path()
    if not _DISK_CACHE or _DISK_CACHE[0].path != path:
        _DISK_CACHE[:] = [autotune.AutotuneCache(path)]
    return _DISK_CACHE[0]


def _storage_format_key(module: "PackedNMLinear") -> str:
    """The stored format as an autotune-cache key part, e.g. ``2:4-w4g128s-b0`` (kernels are timed per format)."""
    s = module.spec
    group = "pc" if s.group_size is None else f"g{s.group_size}"
    quant = s.values_dtype if s.bits == 16 else f"w{s.bits}{group}{'s' if s.symmetric else 'a'}"
    return f"{s.n}:{s.m}-{quant}-b{int(module.bias is not None)}"


def choose_path(module: "PackedNMLinear", x: torch.Tensor) -> str:
    """Name of the compute path for ``module`` on input ``x`` (see the module docstring)."""
    if FORCE_PATH is not None:
        return FORCE_PATH
    m = max(1, x.numel() // max(1, module.in_features))
    bucket = autotune.m_bucket(m)
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    memo = module.__dict__.setdefault("_dispatch_memo", {})
    memo_key = ("choice", str(x.device), x.dtype, bucket, needs_grad)
    name = memo.get(memo_key)
    if name is not None:
        return name
    names = candidate_paths(module, x)
    override = autotune._override(None)
    if x.device.type == "cpu" and override is None:  # Triton on CPU is its interpreter (tests): override only
        names = [n for n in names if n != "triton_w4a16"]
    if override is None and len(names) == 1:
        name = "dense"  # nothing to choose: the exact dequantized path
    else:
        key = autotune.TuneKey(
            autotune.device_name(x.device), module.out_features, module.in_features, bucket,
            str(x.dtype).removeprefix("torch."), _storage_format_key(module) + ("-grad" if needs_grad else ""),
        )
        try:
            choice = autotune.select_backend(
                key,
                {n: (lambda t, n=n: PATHS[n](module, t)) for n in names},
                lambda: torch.randn(bucket, module.in_features, device=x.device, dtype=x.dtype),
                cache=_disk_cache(),
                measure=None if x.device.type == "cuda" else os.environ.get(autotune.ENV_AUTOTUNE, "1") != "0",
                reps=autotune.CPU_REPS if x.device.type == "cpu" else None,
            )
        except ValueError as err:
            raise ValueError(f"{type(module).__name__}({module.extra_repr()}): {err}") from None
        name = choice.backend
        # the measurement built every candidate's cached weights (dense: the reference copy): keep only those of
        # paths some choice uses (a 2:4 int4 SmolLM2 held 160 MB of unused converted weights at M=32 otherwise)
        in_use = set(memo.values()) | {name}
        for loser in names:
            if loser not in in_use:
                module._kernel_cache.pop(loser, None)
                module._kernel_cache.pop(f"{loser}_key", None)
    memo[memo_key] = name
    return name


@torch.no_grad()
def tune_model(model: torch.nn.Module, m_values: tuple[int, ...] = (1, 16, 128, 2048), dtype: torch.dtype | None = None) -> dict[str, dict[int, str]]:
    """Measure (or read from the cache) the path of every packed linear for each M, e.g. right after loading.

    Returns ``{module_name: {M: path}}``. Layers with equal shapes share one measurement through the cache.
    """
    if dtype is None:  # activations run in the model's floating dtype
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float16)
    chosen: dict[str, dict[int, str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, PackedNMLinear):  # the protocol: any module with the packed tensors
            continue
        buf = getattr(module, "nm_values")
        act_dtype = dtype
        chosen[name] = {
            m: choose_path(module, torch.zeros(m, module.in_features, device=buf.device, dtype=act_dtype))
            for m in m_values
        }
    return chosen


def _keep_dense_copy(module: "PackedNMLinear", x: torch.Tensor) -> bool:
    """Whether the dense path keeps its dequantized copy (``HF_SPARSE_DENSE_CACHE``: ``1`` always, ``0`` never).

    Default: kept (re-dequantizing each call made CPU evaluation of an export ~10x slower than dense), except on CPU
    for modules a CPU path (low-bit kernel, bf16 dense) can run: there the export's point is its memory, so the dense
    path re-dequantizes per call, and the dispatch measures it that way (no fp32 copy is held beside the CPU path's).
    """
    setting = os.environ.get(ENV_DENSE_CACHE, "auto")
    if setting in ("0", "1"):
        return setting == "1"
    if x.device.type == "cpu":
        return not any(cpu.SUPPORTED[name](module, x) for name in cpu.RESIDENT)
    return True


def dense_forward(module: "PackedNMLinear", x: torch.Tensor) -> torch.Tensor:
    """Exact dequantized weight + ``F.linear``; the dequantized copy is kept (see ENV_DENSE_CACHE)."""
    if _keep_dense_copy(module, x):
        cache = module._kernel_cache
        key = (x.device, x.dtype)
        if cache.get("dense_key") != key:
            cache["dense"] = module.dequantized_weight(x.dtype)
            cache["dense_key"] = key
        weight = cache["dense"]
    else:
        weight = module.dequantized_weight(x.dtype)
    return F.linear(x, weight, None if module.bias is None else module.bias.to(x.dtype))


def semi_structured_forward(module: "PackedNMLinear", x: torch.Tensor) -> torch.Tensor:
    key = (x.device, x.dtype)
    cache = module._kernel_cache
    if cache.get("semi_structured_key") != key:
        from torch.sparse import to_sparse_semi_structured

        cache.clear()
        cache["semi_structured"] = to_sparse_semi_structured(module.dequantized_weight(x.dtype).contiguous())
        cache["semi_structured_key"] = key
    flat = x.reshape(-1, x.shape[-1])
    out = F.linear(flat, cache["semi_structured"], None if module.bias is None else module.bias.to(x.dtype))
    return out.reshape(*x.shape[:-1], module.out_features)


def _triton_config(module: "PackedNMLinear", x: torch.Tensor):
    """Launch config for this module and M bucket: measured once per (GPU, shape, M bucket, dtype) on CUDA."""
    from .triton_w4a16_nm import KernelConfig, candidate_configs, default_config

    m = max(1, x.numel() // module.in_features)
    bucket = autotune.m_bucket(m)
    memo = module.__dict__.setdefault("_triton_config_memo", {})
    memo_key = (str(x.device), x.dtype, bucket)
    if memo_key in memo:
        return memo[memo_key]
    n, k = module.out_features, module.in_features
    cfg = default_config(bucket, n, k)
    if x.device.type == "cuda" and os.environ.get(autotune.ENV_AUTOTUNE, "1") != "0":
        key = autotune.TuneKey(
            autotune.device_name(x.device), n, k, bucket, str(x.dtype).removeprefix("torch."), _storage_format_key(module) + "|triton-config"
        )
        cache = _disk_cache()
        record = cache.get(key)
        if record is not None and "config" in record:
            cfg = KernelConfig.from_dict(record["config"])
        else:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            xin = torch.randn(bucket, k, device=x.device, dtype=x.dtype)
            times = {}
            for c in candidate_configs(bucket, n, k, sms):
                try:
                    times[c] = autotune.time_ms(lambda c=c: _triton_call(module, xin, c), x.device, warmup=2, reps=5)
                except Exception:  # a launch this GPU cannot run (e.g. shared memory): not a candidate
                    continue
            if times:
                cfg = min(times, key=times.get)
                cache.put(key, {"backend": "triton_w4a16", "config": cfg.as_dict(),
                                "times_ms": {str(c.as_dict()): t for c, t in times.items()}})
    memo[memo_key] = cfg
    return cfg


def _triton_call(module: "PackedNMLinear", x: torch.Tensor, config) -> torch.Tensor:
    from .triton_w4a16_nm import w4a16_nm24_matmul

    bias = None if module.bias is None else module.bias.to(x.dtype)
    return w4a16_nm24_matmul(
        x, module.nm_values, module.nm_positions, module.nm_scales, module.nm_zeros, bias,
        group_size=module.spec.group_size or module.in_features, config=config,
    )


def triton_w4a16_forward(module: "PackedNMLinear", x: torch.Tensor) -> torch.Tensor:
    return _triton_call(module, x, _triton_config(module, x))


PATHS: dict[str, Callable[["PackedNMLinear", torch.Tensor], torch.Tensor]] = {
    "dense": dense_forward,
    "semi_structured": semi_structured_forward,
    "triton_w4a16": triton_w4a16_forward,
    "cpu_int4": cpu.cpu_int4_forward,
    "cpu_int8": cpu.cpu_int8_forward,
    "dense_lowp": cpu.dense_lowp_forward,
    "dequant_bf16": cpu.dequant_bf16_forward,
}
