"""PackedNMLinear: a linear layer that holds an N:M weight in the packed hf_sparse format.

It subclasses ``nn.Linear`` so PEFT (LoRA targeting), transformers and user code treat it as a linear
layer; ``weight`` is a read-only property giving the exactly dequantized dense weight (built on demand,
never stored). The forward goes through :func:`hf_sparse.kernels.dispatch.choose_path`.
Merging a LoRA: use :func:`hf_sparse.merge_lora_keep_mask`, which calls :meth:`add_masked_delta_`
(PEFT's own ``merge`` writes into ``weight.data``, a temporary here, and would be lost).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..format import (
    POSITIONS,
    SCALES,
    VALUES,
    ZEROS,
    NMSpec,
    expected_tensors,
    unpack_positions,
    unpack_weight,
)
from ..kernels import dispatch
from ..quantization import pack_rtn
from .slorb import SLoRB

__all__ = ["PackedNMLinear"]


class PackedNMLinear(nn.Linear):
    """``y = x W^T + b (+ S·(X·x))`` with W stored as kept values + bit-packed positions (+ scales/zeros)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: NMSpec,
        bias: bool = True,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        module_name: str = "<PackedNMLinear>",
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: there is no dense weight parameter
        spec.check_shape(in_features, module_name)
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        dtype = dtype or torch.get_default_dtype()
        for suffix, (shape, tdtype) in expected_tensors(spec, out_features, in_features, False).items():
            if suffix in (VALUES, POSITIONS, SCALES, ZEROS):
                self.register_buffer(suffix, torch.zeros(shape, dtype=tdtype, device=device))
        for suffix in (SCALES, ZEROS):
            if not hasattr(self, suffix):
                setattr(self, suffix, None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        if spec.slorb is not None:
            slorb = SLoRB(in_features, out_features, spec.slorb["group_size"], bool(spec.slorb.get("train_projection")))
            self.slorb = slorb.to(device=device, dtype=dtype)
        else:
            self.slorb = None
        self._kernel_cache: dict[str, Any] = {}

    # ---- views of the packed weight ----
    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense ``[out, in]`` N:M weight, exactly dequantized (zeros at pruned places)."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return unpack_weight(getattr(self, VALUES), getattr(self, POSITIONS), self.nm_scales, self.nm_zeros, self.spec, dtype)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """Dequantized dense weight (a fresh tensor: writing into it does not change the module)."""
        return self.dequantized_weight()

    def nm_mask(self) -> torch.Tensor:
        """Bool ``[out, in]`` mask of the kept positions (what ``merge_lora_keep_mask`` respects)."""
        kept = self.spec.kept(self.in_features)
        pos = unpack_positions(getattr(self, POSITIONS), self.spec, kept).long()
        rows = pos.shape[0]
        mask = torch.zeros(rows, self.in_features // self.spec.m, self.spec.m, dtype=torch.bool, device=pos.device)
        mask.scatter_(-1, pos.reshape(rows, -1, self.spec.n), True)
        return mask.reshape(rows, self.in_features)

    @torch.no_grad()
    def add_masked_delta_(self, delta: torch.Tensor, mask: torch.Tensor) -> None:
        """``W <- W + mask ⊙ delta`` and repack (quantized exports are re-rounded with RTN, same spec)."""

        if delta.shape != (self.out_features, self.in_features) or mask.shape != delta.shape:
            raise ValueError(
                f"add_masked_delta_: delta/mask must be [{self.out_features}, {self.in_features}], "
                f"got {tuple(delta.shape)} / {tuple(mask.shape)}"
            )
        new = self.dequantized_weight(torch.float32) + delta.to(torch.float32) * mask
        packed = pack_rtn(new, mask.bool(), self.spec)
        getattr(self, VALUES).copy_(packed.values)
        getattr(self, POSITIONS).copy_(packed.positions)
        if packed.scales is not None:
            self.nm_scales.copy_(packed.scales)
        if packed.zeros is not None:
            self.nm_zeros.copy_(packed.zeros)
        self._kernel_cache.clear()

    # ---- compute ----
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = dispatch.PATHS[dispatch.choose_path(self, x)](self, x)
        if self.slorb is not None:
            out = out + self.slorb(x).to(out.dtype)
        return out

    def _apply(self, fn, recurse=True):  # moving/casting invalidates cached compressed weights
        self._kernel_cache = {}
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        s = self.spec
        group = "per-channel" if s.group_size is None else f"g{s.group_size}"
        quant = f"{s.values_dtype}" if s.bits == 16 else f"int{s.bits} {group} {'sym' if s.symmetric else 'asym'}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {s.n}:{s.m}, {quant}, bias={self.bias is not None}"
