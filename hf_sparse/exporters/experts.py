"""Export of fused MoE expert parameters: N:M ``[E, ., .]`` tensors packed per expert (format version 2).

Sources are the AST expert wrappers of a PeftModel (weight + mask, read without merging) or, in a merged model, the
fused expert weights that are exactly N:M along their input dimension (others stay dense, with a warning). Each
expert matrix is packed as a linear's weight in the logical ``[out, in]`` layout (``[E, in, out]`` parameters are
transposed first) with RTN: rows are independent, so the ``[E*out, in]`` stack packs exactly like E separate
linears. GPTQ would need per-expert Hessians of the routed tokens: experts are packed with RTN under
``method="gptq"`` and the log says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..format import POSITIONS, SCALES, VALUES, ZEROS, NMSpec
from ..quantization import PackedWeight, get_quantization_method
from ..sparsity.experts import default_expert_parameters, expert_input_dim
from ..sparsity.nm import is_nm_sparse, nm_mask
from ..tuners.ast.experts import ParamWrapper

logger = logging.getLogger(__name__)

__all__ = ["ExpertSource", "collect_sparse_experts", "pack_experts", "expert_tensors", "fake_quantize_experts"]


@dataclass
class ExpertSource:
    """One fused expert parameter to export, as ``[E, out, in]`` (``transposed``: the parameter is ``[E, in, out]``)."""

    name: str
    param: nn.Parameter
    weight: torch.Tensor  # [E, out, in]
    mask: torch.Tensor  # bool [E, out, in], N:M along in
    transposed: bool


def _out_in(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    return t.transpose(1, 2) if transposed else t


def collect_sparse_experts(inner: nn.Module, n: int, m: int) -> list[ExpertSource]:
    """The N:M fused expert parameters of ``inner`` (AST wrappers first; else the exactly N:M ones)."""
    sources = []
    wrappers = [mod for mod in inner.modules() if isinstance(mod, ParamWrapper)]
    if wrappers:
        for w in wrappers:
            adapter = next(a for a in w.active_adapters if a in w.ast_mask)
            if w.ast_nm[adapter] != (n, m):
                raise ValueError(f"{w._ast_module_name}: AST pattern {w.ast_nm[adapter]} differs from n={n}, m={m}")
            transposed = w.input_dim == 1
            param = w.get_param()
            sources.append(ExpertSource(w._ast_module_name, param, _out_in(param.detach(), transposed),
                                        _out_in(w.ast_mask[adapter], transposed), transposed))
        return sorted(sources, key=lambda s: s.name)
    for name in default_expert_parameters(inner):
        module_name, _, pname = name.rpartition(".")
        module = inner.get_submodule(module_name)
        param = getattr(module, pname)
        transposed = expert_input_dim(module, pname, name) == 1
        w = _out_in(param.detach(), transposed)
        if w.shape[2] % m or not is_nm_sparse(w, n, m, dim=2):
            logger.warning("%s is not %d:%d sparse along its input dimension: exported dense", name, n, m)
            continue
        mask = nm_mask(w.abs().float() + (w != 0).float(), n, m, dim=2)
        sources.append(ExpertSource(name, param, w, mask, transposed))
    return sources


def pack_experts(sources: list[ExpertSource], spec: NMSpec, method: str) -> dict[str, PackedWeight]:
    if sources and method != "rtn":
        logger.warning("export: method=%r packs the %d fused expert parameters with RTN (per-expert Hessians of "
                       "routed tokens are not collected)", method, len(sources))
    rtn = get_quantization_method("rtn")
    packed = {}
    for s in sources:
        spec.check_shape(s.weight.shape[2], s.name)
        experts, rows, cols = s.weight.shape
        p = rtn.pack(s.weight.reshape(experts * rows, cols), s.mask.reshape(experts * rows, cols), spec, None)
        reshape = lambda t: None if t is None else t.reshape(experts, rows, *t.shape[1:])  # noqa: E731
        packed[s.name] = PackedWeight(reshape(p.values), reshape(p.positions), reshape(p.scales), reshape(p.zeros))
    return packed


def expert_tensors(packed: dict[str, PackedWeight]) -> dict[str, torch.Tensor]:
    """The safetensors entries (``<param>.nm_values`` ...) of the packed expert parameters."""
    out = {}
    for name, p in packed.items():
        for suffix, t in ((VALUES, p.values), (POSITIONS, p.positions), (SCALES, p.scales), (ZEROS, p.zeros)):
            if t is not None:
                out[f"{name}.{suffix}"] = t.contiguous()
    return out


@torch.no_grad()
def fake_quantize_experts(inner: nn.Module, sources: list[ExpertSource], packed: dict[str, PackedWeight],
                          spec: NMSpec) -> None:
    """Write the exact dequantized expert weights into ``inner``'s (merged) parameters: what the loaded export uses."""
    for s in sources:
        module_name, _, pname = s.name.rpartition(".")
        param = getattr(inner.get_submodule(module_name), pname)
        p = packed[s.name]
        experts, rows = p.values.shape[:2]
        flat = PackedWeight(*(None if t is None else t.reshape(experts * rows, *t.shape[2:])
                              for t in (p.values, p.positions, p.scales, p.zeros)))
        dense = flat.dense(spec, torch.float32).reshape(experts, rows, -1)
        param.data.copy_(_out_in(dense, s.transposed).to(param.dtype))
