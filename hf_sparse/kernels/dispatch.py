"""The one place that chooses how a packed N:M linear computes.

``choose_path(module, x) -> str`` returns the name of an entry of :data:`PATHS`; ``PATHS[name](module, x)``
computes ``y = x W^T + b`` (without the SLoRB branch, which the module adds). Paths today:

* ``"dense"``: dequantize the N:M weight exactly (zeros at pruned places) and call ``F.linear``. Works
  everywhere; the reference every other path is tested against.
* ``"semi_structured"``: ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt, or CUTLASS when forced)
  on CUDA sm80+, fp16/bf16 activations, 2:4, weight shape a multiple of the backend's minimum tile. The
  compressed weight is built once per module/device/dtype and cached (not persisted).

To add a kernel (e.g. a Triton int4 x 2:4 matmul): write ``def forward(module, x) -> Tensor``, register it
in ``PATHS`` and add its condition to ``choose_path``. Keep the choice a pure function of the module's
spec, the device and the input shape so it can be measured and cached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .packed_linear import PackedNMLinear

__all__ = ["choose_path", "PATHS", "semi_structured_supported", "FORCE_PATH"]

# tests and benchmarks may pin a path ("dense", "semi_structured"); None = automatic choice
FORCE_PATH: str | None = None


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


def choose_path(module: "PackedNMLinear", x: torch.Tensor) -> str:
    """Name of the compute path for ``module`` on input ``x`` (see the module docstring)."""
    if FORCE_PATH is not None:
        return FORCE_PATH
    spec = module.spec
    if semi_structured_supported(module.out_features, module.in_features, spec.n, spec.m, x.dtype, x.device):
        return "semi_structured"
    return "dense"


def dense_forward(module: "PackedNMLinear", x: torch.Tensor) -> torch.Tensor:
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


PATHS: dict[str, Callable[["PackedNMLinear", torch.Tensor], torch.Tensor]] = {
    "dense": dense_forward,
    "semi_structured": semi_structured_forward,
}
