"""The inputs each routed expert actually sees: for activation-aware scores (AST recompute, Wanda, SparseGPT).

An expert matrix's input is not the layer input: ``gate_up_proj[e]`` sees only the tokens the router sends to
expert ``e``, and ``down_proj[e]`` sees the gated intermediate activation of those tokens. This recomputes them
the way transformers' batched experts implementation does (``use_experts_implementation`` attributes:
``is_transposed``, ``has_bias``, ``has_gate``, ``_apply_gate``), with whatever weights the caller passes (the
masked ones during AST training).
"""

from __future__ import annotations

from typing import Iterator, Mapping, Optional

import torch
from torch import nn

__all__ = ["routed_expert_inputs", "supports_routed_inputs", "UP_PROJECTIONS"]

#: fused expert weights whose input is the layer input (down_proj's input is the gated intermediate)
UP_PROJECTIONS = ("gate_up_proj", "up_proj")


def supports_routed_inputs(experts: nn.Module) -> bool:
    """Modules built by ``use_experts_implementation`` (forward ``(hidden_states, top_k_index, top_k_weights)``)."""
    return all(hasattr(experts, a) for a in ("is_transposed", "has_gate", "has_bias")) and (
        hasattr(experts, "gate_up_proj") or hasattr(experts, "up_proj")
    )


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else x @ weight.t()
    return out if bias is None else out + bias


@torch.no_grad()
def routed_expert_inputs(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    weights: Optional[Mapping[str, torch.Tensor]] = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(expert, x_e, h_e)`` for every expert that receives tokens: ``x_e`` the routed layer inputs
    (``[T_e, H]``, input of the up projection), ``h_e`` the gated intermediate (``[T_e, I]``, input of down_proj).

    ``weights`` overrides the module's tensors by name (e.g. ``{"gate_up_proj": W ⊙ M}``).
    """
    if not supports_routed_inputs(experts):
        raise TypeError(f"{type(experts).__name__} is not a use_experts_implementation experts module")
    weights = dict(weights or {})
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    up = weights.get(up_name)
    if up is None:
        up = getattr(experts, up_name)
    up = up.detach()
    bias = getattr(experts, f"{up_name}_bias", None) if experts.has_bias else None
    x = hidden_states.detach().reshape(-1, hidden_states.shape[-1])
    index = top_k_index.reshape(x.shape[0], -1)
    num_experts = up.shape[0]
    for e in range(num_experts):
        tokens = (index == e).any(dim=-1).nonzero().flatten()
        if tokens.numel() == 0:
            continue
        x_e = x[tokens].to(up.dtype)
        proj = _linear(x_e, up[e], None if bias is None else bias[e].detach(), experts.is_transposed)
        h_e = experts._apply_gate(proj) if experts.has_gate else experts.act_fn(proj)
        yield e, x_e, h_e
