"""PackedNMLinear: a linear layer that holds an N:M weight in the packed hf_sparse format.

It subclasses ``nn.Linear`` so PEFT (LoRA targeting), transformers and user code treat it as a linear
layer; ``weight`` is a read-only property giving the exactly dequantized dense weight (built on demand,
never stored). The forward goes through :func:`hf_sparse.kernels.dispatch.choose_path`.
Merging a LoRA: use :func:`hf_sparse.merge_lora_keep_mask`, or PEFT's ``merge_and_unload`` with hf_sparse's LoRA
layer (:mod:`hf_sparse.integrations.peft_lora`); both call :meth:`add_masked_delta_`. PEFT's default merge
(``weight.data = ...``) raises instead of losing the LoRA silently (see :attr:`PackedNMLinear.weight`).

Dtype rule: casting the module (``model.to(dtype)``, ``.bfloat16()``...) changes the compute dtype (bias, SLoRB,
the dequantized weight the kernels build) but never the packed tensors: their dtypes are part of the stored format
(``quantization_config``), as when ``from_pretrained(dtype=...)`` loads them, so a cast model saves and reloads.
Re-export (``hf_sparse.export(..., dtype=...)``) to change the stored format.

Memory: what the kernels cache (the dequantized dense copy, converted low-bit weights) is held as non-persistent
buffers, so ``model.get_memory_footprint()`` counts it once it exists (it is never saved).
"""

from __future__ import annotations

import sys
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

__all__ = ["PackedNMLinear", "PackedWeightView"]

#: the packed tensors, whose dtypes the format fixes (a dtype cast of the module leaves them as stored)
PACKED_TENSORS = (VALUES, POSITIONS, SCALES, ZEROS)
_CACHE_BUFFER_PREFIX = "_kernel_cache_"


class PackedWeightView(torch.Tensor):
    """``PackedNMLinear.weight`` as PEFT sees it: a dequantized copy that refuses ``.data`` assignment (writes fail,
    not vanish).

    PEFT's default LoRA merge/unmerge (and PiSSA/OLoRA-style inits) end in ``base_layer.weight.data = ...``, which on
    a temporary would silently drop the change. Every other use (shape, dtype, ``F.linear``, clone) is a plain tensor.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl  # results of ops are plain tensors

    @property
    def data(self) -> torch.Tensor:  # type: ignore[override]
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        raise RuntimeError(
            f"{getattr(self, '_hf_sparse_owner', 'PackedNMLinear')}.weight is a dequantized view of packed N:M tensors: "
            "assigning to weight.data (what PEFT's default LoRA merge/unmerge does) cannot change them and would be "
            "lost. Merge a LoRA with hf_sparse.merge_lora_keep_mask(peft_model), or build it with "
            "`from hf_sparse.integrations.peft_lora import register_packed_lora; "
            "get_peft_model(model, register_packed_lora(lora_config))` so that merge_and_unload() keeps the N:M mask"
        )

    def __deepcopy__(self, memo: dict) -> torch.Tensor:
        return self.as_subclass(torch.Tensor).clone()

    def __reduce_ex__(self, protocol: int):
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


def _cached_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors a kernel-cache entry holds (tensors, tuples of them, tensor subclasses' inner tensors)."""
    if isinstance(value, torch.Tensor):
        flatten = getattr(type(value), "__tensor_flatten__", None)
        if flatten is not None and type(value) is not torch.Tensor and not isinstance(value, nn.Parameter):
            names, _ = value.__tensor_flatten__()  # e.g. SparseSemiStructuredTensor: packed values + metadata
            return [t for n in names for t in _cached_tensors(getattr(value, n))]
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _cached_tensors(v)]
    return []


class _KernelCache(dict):
    """``module._kernel_cache``: a dict whose tensors are mirrored as the module's non-persistent buffers.

    The kernels (:mod:`hf_sparse.kernels`) keep their converted weights here; mirroring them in ``_buffers`` makes
    ``model.get_memory_footprint()`` (parameters + buffers) report what is really held. It references the module's
    ``_buffers`` dict (not the module), so ``copy.deepcopy``/pickle keep the copy pointing at the copied module's.
    """

    def __init__(self, buffers: dict, non_persistent: set) -> None:
        super().__init__()
        self._buffers, self._non_persistent = buffers, non_persistent

    def _sync(self) -> None:
        for name in [n for n in self._buffers if n.startswith(_CACHE_BUFFER_PREFIX)]:
            del self._buffers[name]
            self._non_persistent.discard(name)
        for i, tensor in enumerate(t for v in self.values() for t in _cached_tensors(v)):
            name = f"{_CACHE_BUFFER_PREFIX}{i}"
            self._buffers[name] = tensor
            self._non_persistent.add(name)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._sync()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._sync()

    def pop(self, key: str, *default: Any) -> Any:
        value = super().pop(key, *default)
        self._sync()
        return value

    def clear(self) -> None:
        super().clear()
        self._sync()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._sync()

    def setdefault(self, key: str, default: Any = None) -> Any:
        value = super().setdefault(key, default)
        self._sync()
        return value


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
        self._module_name = module_name
        self.was_conv1d = False  # the loader sets it for GPT-2 Conv1D targets (so dequantize() rebuilds a Conv1D)
        self._kernel_cache: dict[str, Any] = _KernelCache(self._buffers, self._non_persistent_buffers_set)

    # ---- views of the packed weight ----
    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense ``[out, in]`` N:M weight, exactly dequantized (zeros at pruned places)."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return unpack_weight(getattr(self, VALUES), getattr(self, POSITIONS), self.nm_scales, self.nm_zeros, self.spec, dtype)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """Dequantized dense weight, a fresh tensor (writing into it does not change the module).

        PEFT's code (the caller's module is ``peft.*``) gets it as a :class:`PackedWeightView`, whose ``.data``
        assignment raises: that is how PEFT's default LoRA merge writes, and the write would be lost. Everyone else
        gets a plain tensor (a subclass would upset e.g. ``torch.testing.assert_close`` against a Parameter).
        """
        weight = self.dequantized_weight()
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller == "peft" or caller.startswith("peft."):
            weight = weight.as_subclass(PackedWeightView)
            weight._hf_sparse_owner = self._module_name
        return weight

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

    def _apply(self, fn, recurse=True):
        """Moves and casts: the packed tensors move but keep their stored dtype (the module docstring's rule);
        cached kernel weights are dropped (rebuilt for the new device/dtype on the next forward)."""
        self._kernel_cache.clear()
        packed = {id(t) for name, t in self._buffers.items() if name in PACKED_TENSORS and t is not None}

        def keep_stored_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if id(t) in packed and out.dtype != t.dtype:
                out = t.to(device=out.device)
            return out

        return super()._apply(keep_stored_dtype, recurse)

    def extra_repr(self) -> str:
        s = self.spec
        group = "per-channel" if s.group_size is None else f"g{s.group_size}"
        quant = f"{s.values_dtype}" if s.bits == 16 else f"int{s.bits} {group} {'sym' if s.symmetric else 'asym'}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {s.n}:{s.m}, {quant}, bias={self.bias is not None}"
