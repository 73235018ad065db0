"""A loaded fused MoE expert parameter in the packed hf_sparse format (``[E, ...]`` values/positions/scales/zeros).

The experts module of transformers 5 reads its weights as attributes (``self.gate_up_proj[expert_ids]``), whatever
experts implementation runs. So the loader leaves the module's class and forward alone: it registers a
:class:`PackedExpertWeight` submodule under the parameter's name (state-dict keys ``<param>.nm_values`` ...), and
forward hooks put the exactly dequantized weight, in the module's own layout (``[E, out, in]``, or ``[E, in, out]``
for ``is_transposed`` modules), in the instance ``__dict__`` under that name while the forward runs (an instance
attribute shadows the submodule: ``get_submodule``/``state_dict`` see the module, the experts forward the tensor). The dequantized tensor is
kept (non-persistent, never saved) after the first use, dropped on device moves and dtype casts (``HF_SPARSE_DENSE_
CACHE=0``: rebuilt every access). On CPU that is the exact reference; there is no per-expert sparse kernel yet.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn

from ..format import POSITIONS, SCALES, VALUES, ZEROS, NMSpec, expected_expert_tensors, unpack_expert_weight

__all__ = ["PackedExpertWeight", "install_packed_expert", "packed_expert_names"]

class PackedExpertWeight(nn.Module):
    """Packed N:M tensors of one fused expert parameter; :meth:`dequantized` gives the dense ``[E, out, in]``."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, spec: NMSpec, transposed: bool,
                 dtype: Optional[torch.dtype] = None, device: Any = None, name: str = "<experts>") -> None:
        super().__init__()
        spec.check_shape(in_features, name)
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.spec, self.transposed, self.compute_dtype, self._name = spec, transposed, dtype or torch.float32, name
        for suffix, (shape, tdtype) in expected_expert_tensors(spec, num_experts, out_features, in_features).items():
            self.register_buffer(suffix, torch.zeros(shape, dtype=tdtype, device=device))
        for suffix in (SCALES, ZEROS):
            if suffix not in self._buffers:
                setattr(self, suffix, None)
        self._dense: Optional[torch.Tensor] = None

    def dequantized(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``[E, out, in]``, exactly dequantized (zeros at pruned places)."""
        return unpack_expert_weight(getattr(self, VALUES), getattr(self, POSITIONS), self.nm_scales, self.nm_zeros,
                                    self.spec, dtype or self.compute_dtype)

    def weight_for_module(self) -> torch.Tensor:
        """The tensor the experts forward reads, in its own layout (cached unless ``HF_SPARSE_DENSE_CACHE=0``)."""
        if self._dense is not None:
            return self._dense
        dense = self.dequantized()
        dense = dense.transpose(1, 2).contiguous() if self.transposed else dense
        if os.environ.get("HF_SPARSE_DENSE_CACHE", "1") != "0":
            self._dense = dense
        return dense

    def _apply(self, fn, recurse=True):
        """Moves keep the packed dtypes (the format fixes them); a float cast changes the compute dtype."""
        self._dense = None
        stored = {id(t) for t in self._buffers.values() if t is not None}

        def keep_stored_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return t.to(device=out.device) if id(t) in stored and out.dtype != t.dtype else out

        probe = fn(torch.zeros((), dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return super()._apply(keep_stored_dtype, recurse)

    def extra_repr(self) -> str:
        s = self.spec
        quant = s.values_dtype if s.bits == 16 else f"int{s.bits}"
        return f"experts={self.num_experts}, out={self.out_features}, in={self.in_features}, {s.n}:{s.m}, {quant}"


def packed_expert_names(module: nn.Module) -> tuple[str, ...]:
    return tuple(sorted(getattr(module, "_hf_sparse_packed_experts", ())))


def _expose_dense(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: while the forward runs, the dense tensors shadow the submodules of the same name."""
    for name in module._hf_sparse_packed_experts:
        object.__setattr__(module, name, module._modules[name].weight_for_module())


def _hide_dense(module: nn.Module, args: tuple, output: Any) -> None:
    for name in module._hf_sparse_packed_experts:
        module.__dict__.pop(name, None)


def install_packed_expert(experts: nn.Module, parameter_name: str, packed: PackedExpertWeight) -> None:
    """Replace ``experts.<parameter_name>`` (a 3-D parameter) by ``packed``; the module keeps computing as before."""
    if parameter_name in experts._parameters:
        del experts._parameters[parameter_name]
    experts.add_module(parameter_name, packed)
    names = getattr(experts, "_hf_sparse_packed_experts", None)
    if names is None:
        names = experts._hf_sparse_packed_experts = set()
        experts.register_forward_pre_hook(_expose_dense)
        experts.register_forward_hook(_hide_dense, always_call=True)
    names.add(parameter_name)
