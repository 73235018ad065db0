"""The progressive (CAST-style) schedule of an AST layer: dense forward, L1 decay outside the mask, one final prune.

CAST (arXiv 2509.25996; details from a third-party reproduction, to be measured rather than trusted) keeps the
forward dense and moves the model towards N:M gradually: the weights outside the current mask get an L1 decay that
grows over training, a learnable scale per output row and half of the input row makes up for the shrinking weights,
and one hard N:M prune ends training. Here that is three functions the training callback calls:

- :func:`cast_weight`: the dense forward weight ``W ⊙ S`` (``S`` = the row's two half scales, broadcast);
- :func:`add_l1_decay_to_grad`: ``grad += λ·sign(W)·¬M`` (so it enters Adam's first moment and, squared with the
  gradient, the second: the optimizer itself is unchanged);
- :func:`finalize_progressive`: ``W ← (W ⊙ S) ⊙ M``, ``S ← 1``, and the layer switches to the masked forward; from
  then on it is an ordinary AST layer (merge, export and ``from_pretrained`` as usual).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["add_l1_decay_to_grad", "cast_weight", "finalize_progressive", "half_row_scales", "init_progressive"]


def init_progressive(layer: Any, adapter_name: str, config: Any, module_name: str) -> None:
    """Create the adapter's per-half-row scales (ones, ``[out, 2]``) and its dense-forward flag (True)."""
    n_in = layer.in_features
    if config.cast_scales and n_in % (2 * config.m):
        raise ValueError(f"{module_name}: ASTConfig(schedule='progressive', cast_scales=True) needs in_features "
                         f"({n_in}) divisible by 2*m={2 * config.m}, so that no N:M group straddles the two halves")
    weight = layer.get_base_layer().weight
    scale = nn.Parameter(torch.ones(layer.out_features, 2, device=weight.device, dtype=torch.float32),
                         requires_grad=bool(config.cast_scales))
    layer.ast_cast_scale[adapter_name] = scale
    layer.ast_cast_dense[adapter_name] = torch.ones((), dtype=torch.bool, device=weight.device)


def half_row_scales(scale: torch.Tensor, in_features: int, fan_in_fan_out: bool) -> torch.Tensor:
    """``[out, 2]`` scales as a tensor that broadcasts over the weight (its own layout): first half, second half."""
    half = in_features // 2
    expanded = scale.repeat_interleave(torch.tensor([half, in_features - half], device=scale.device), dim=1)
    return expanded.t() if fan_in_fan_out else expanded


def cast_weight(layer: Any, adapter_name: str) -> torch.Tensor:
    """The dense forward weight of the progressive phase: ``W ⊙ S`` (gradients reach W and S)."""
    weight = layer.get_base_layer().weight
    scale = half_row_scales(layer.ast_cast_scale[adapter_name], layer.in_features, layer.fan_in_fan_out)
    return weight * scale.to(weight.dtype)


def is_dense_phase(layer: Any, adapter_name: str) -> bool:
    flags = getattr(layer, "ast_cast_dense", None)
    return flags is not None and adapter_name in flags and bool(flags[adapter_name])


@torch.no_grad()
def add_l1_decay_to_grad(ast_model: Any, lam: float) -> int:
    """``grad += λ·sign(W)·¬M`` on every target weight still in the dense phase; returns how many got it."""
    count = 0
    for _, layer in ast_model.ast_layers():
        name = layer.active_adapters[0]
        if not is_dense_phase(layer, name) or lam <= 0:
            continue
        weight = layer.get_base_layer().weight
        if not weight.requires_grad:
            continue
        term = torch.sign(weight.detach()) * (~layer.ast_mask[name]) * lam
        weight.grad = term.to(weight.dtype) if weight.grad is None else weight.grad.add_(term.to(weight.grad.dtype))
        count += 1
    return count


@torch.no_grad()
def finalize_progressive(ast_model: Any) -> dict[str, float]:
    """The final hard N:M prune: fold the scales into the weight, zero what the mask drops, switch to masked forward.

    Uses each layer's current mask (the last recompute). Returns ``{"layers", "pruned_norm_fraction"}``: the share
    of the scaled weights' Frobenius norm that the prune removed (how far the decay had already gone).
    """
    layers, kept_sq, pruned_sq = 0, 0.0, 0.0
    for _, layer in ast_model.ast_layers():
        name = layer.active_adapters[0]
        if not is_dense_phase(layer, name):
            continue
        weight = layer.get_base_layer().weight
        mask = layer.ast_mask[name]
        scaled = cast_weight(layer, name).detach()
        kept_sq += float((scaled * mask).float().pow(2).sum())
        pruned_sq += float((scaled * ~mask).float().pow(2).sum())
        weight.data.copy_(scaled * mask)
        scale = layer.ast_cast_scale[name]
        scale.fill_(1.0)
        scale.requires_grad_(False)
        layer.ast_cast_dense[name].fill_(False)
        layers += 1
    total = kept_sq + pruned_sq
    return {"layers": layers, "pruned_norm_fraction": (pruned_sq / total) ** 0.5 if total else 0.0}
