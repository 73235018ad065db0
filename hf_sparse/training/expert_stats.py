"""Activation-aware mask scores for fused MoE experts (``ASTConfig(mask_score="activation")``).

Each expert matrix is scored with |W_e|·‖x_e‖ from the inputs *that expert* received since the last recompute
(:func:`hf_sparse.modules.experts.routed_expert_inputs`: routed tokens for the up projection, their gated
intermediate for ``down_proj``). Experts that received no tokens keep their mask. The sums live in the mask
callback's ``_input_sq`` dict (``name`` -> ``[E, in]``, ``name#tokens`` -> ``[E]``), so they are saved with every
checkpoint and all-reduced under DDP like the Linear targets' norms. Experts modules that are not
``use_experts_implementation`` classes (Llama-4's) fall back to magnitude, said once in the log.

Under FSDP2 the hook runs inside the decoder layer's forward (gathered weights; the expert-sharded masks are
gathered too), so every rank still sums over *all* experts for its own tokens; the scores are then all-reduced and
sliced to the experts this rank holds (:func:`hf_sparse.training.fsdp.local_rows`).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from ..modules.experts import UP_PROJECTIONS, routed_expert_inputs, supports_routed_inputs
from ..sparsity.scores import magnitude_score
from ..tuners.ast.experts import ParamWrapper
from .fsdp import is_sharded, local, local_rows

logger = logging.getLogger(__name__)

__all__ = ["expert_activation_scores", "register_expert_activation_hooks", "TOKENS_SUFFIX"]

TOKENS_SUFFIX = "#tokens"


def _outer_wrappers(ast_model: Any) -> list[tuple[ParamWrapper, dict[str, tuple[str, ParamWrapper]]]]:
    """The outermost wrapper of each experts module, with all wrappers of that module by parameter name."""
    layers = ast_model.ast_expert_layers()
    groups: dict[int, dict[str, tuple[str, ParamWrapper]]] = {}
    inner = set()
    for name, wrapper in layers:
        groups.setdefault(id(wrapper.get_base_layer()), {})[wrapper.parameter_name] = (name, wrapper)
        if isinstance(wrapper.base_layer, ParamWrapper):
            inner.add(id(wrapper.base_layer))
    return [(w, groups[id(w.get_base_layer())]) for _, w in layers if id(w) not in inner]


def _accumulate(store: dict[str, torch.Tensor], key: str, value: torch.Tensor, ema: Optional[float]) -> None:
    prev = store.get(key)
    if prev is None:
        store[key] = value.clone()
    elif ema is None or key.endswith(TOKENS_SUFFIX):
        prev.add_(value.to(prev.device))  # a resumed store may sit on the CPU
    else:
        prev.mul_(ema).add_(value.to(prev.device), alpha=1 - ema)


def _full(mask: torch.Tensor) -> torch.Tensor:
    """FSDP2: the whole expert-sharded mask (the weight is gathered inside the forward), else the mask itself."""
    return mask.full_tensor() if is_sharded(mask) else mask


def register_expert_activation_hooks(ast_model: Any, store: dict[str, torch.Tensor], ema: Optional[float]) -> list:
    """Forward pre-hooks (on the outermost wrapper: the parameters are plain there) filling ``store``."""
    handles = []
    for outer, members in _outer_wrappers(ast_model):
        experts = outer.get_base_layer()
        if not supports_routed_inputs(experts):
            logger.warning(
                "AST mask_score='activation': %s (%s) is not a use_experts_implementation class; its experts are "
                "recomputed by magnitude", next(iter(members.values()))[0], type(experts).__name__,
            )
            continue

        def hook(module: nn.Module, args: tuple, kwargs: dict, experts: nn.Module = experts,
                 members: dict = members) -> None:
            if not module.training or not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
                return  # eval, or activation checkpointing's re-run inside backward (counted once already)
            hidden = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else next(v for k, v in kwargs.items() if k != "hidden_states")
            masked = {p: w.get_param().detach() * _full(w.ast_mask[w.active_adapters[0]])
                      for p, (_, w) in members.items()}
            num_experts = next(iter(members.values()))[1].num_experts
            # every key on every call (zeros included): DDP ranks all-reduce the same set of tensors
            sums = {name: torch.zeros(num_experts, w.in_features, device=hidden.device) for name, w in members.values()}
            tokens = torch.zeros(num_experts, dtype=torch.float32, device=hidden.device)
            for e, x_e, h_e in routed_expert_inputs(experts, hidden, index, masked):
                tokens[e] = x_e.shape[0]
                for pname, (name, _) in members.items():
                    sums[name][e] = (x_e if pname in UP_PROJECTIONS else h_e).float().pow(2).sum(0)
            for name, _ in members.values():
                _accumulate(store, name, sums[name], ema)
                _accumulate(store, name + TOKENS_SUFFIX, tokens, ema)

        handles.append(outer.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def expert_activation_scores(ast_model: Any, store: dict[str, torch.Tensor], distributed: bool
                             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(scores, experts to keep) per expert parameter: |W_e|·‖x_e‖, and bool ``[E]`` of experts without tokens."""
    scores, keep = {}, {}
    for name, wrapper in ast_model.ast_expert_layers():
        param = wrapper.get_param()
        sq, tokens = store.get(name), store.get(name + TOKENS_SUFFIX)
        if sq is None or tokens is None:
            continue  # no stats (unsupported module or no forward yet): magnitude
        sq, tokens = sq.to(param.device), tokens.to(param.device)
        if distributed:
            sq, tokens = sq.clone(), tokens.clone()
            torch.distributed.all_reduce(sq)
            torch.distributed.all_reduce(tokens)
        rows = local_rows(param)  # FSDP2: the experts this rank holds (all of them otherwise)
        sq, tokens = sq[rows], tokens[rows]
        norm = sq.sqrt().unsqueeze(1 if wrapper.input_dim == 2 else 2)  # [E, 1, in] or [E, in, 1]
        scores[name] = magnitude_score(local(param)) * norm
        keep[name] = tokens == 0
    return scores, keep
