"""One-shot N:M pruning of fused MoE expert parameters, with statistics per expert from its routed tokens.

Wanda's ‖x_j‖ and SparseGPT's Hessian ``X^T X`` of expert ``e`` come only from the tokens the router sends to ``e``
during calibration (:func:`hf_sparse.modules.experts.routed_expert_inputs`: the routed layer inputs for
``gate_up_proj``/``up_proj``, their gated intermediate for ``down_proj``). An expert with fewer than
``min_tokens`` routed calibration tokens is pruned by magnitude instead (its statistics would be noise), and one log
line counts those fallbacks. Statistics come from one calibration pass through the model as it is (run it after
the linears were pruned to calibrate on their pruned outputs); each expert matrix is pruned with the registered
pruner on a per-expert view of the 3-D parameter, so the zeros (and SparseGPT's updates) land in the parameter.
"""

from __future__ import annotations

import logging
from typing import Optional, Union

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..calibration import CalibrationIds, as_batches
from ..modules.experts import UP_PROJECTIONS, routed_expert_inputs, supports_routed_inputs
from ..sparsity.experts import default_expert_parameters, expert_input_dim
from ..sparsity.nm import validate_nm
from .registry import get_pruner

logger = logging.getLogger(__name__)

__all__ = ["prune_experts_oneshot", "DEFAULT_MIN_EXPERT_TOKENS"]

#: experts that receive fewer routed calibration tokens than this are pruned by magnitude
DEFAULT_MIN_EXPERT_TOKENS = 16


def _expert_view(param: nn.Parameter, e: int, input_dim: int) -> nn.Module:
    """A Linear ([out, in]) or Conv1D ([in, out]) whose weight is expert ``e``'s slice of ``param`` (shared storage)."""
    view = param.data[e]
    if input_dim == 2:
        module: nn.Module = nn.Linear(view.shape[1], view.shape[0], bias=False, device="meta")
    else:
        module = Conv1D(view.shape[1], view.shape[0])
        module.bias = None
    module.weight = nn.Parameter(view, requires_grad=False)
    return module


@torch.no_grad()
def prune_experts_oneshot(
    model: nn.Module,
    method: str,
    calibration_ids: Optional[CalibrationIds] = None,
    n: int = 2,
    m: int = 4,
    parameters: Optional[list[str]] = None,
    min_tokens: int = DEFAULT_MIN_EXPERT_TOKENS,
    batch_size: int = 8,
    modules: Optional[dict[str, tuple[nn.Module, str]]] = None,
) -> dict[str, torch.Tensor]:
    """Prune the fused expert weights of ``model`` to exact N:M in place; returns bool ``[E, ., .]`` keep-masks.

    Args:
        method: a registered pruner (``"magnitude"``, ``"wanda"``, ``"sparsegpt"``).
        parameters: qualified parameter names; ``None``: every fused expert weight (AST's default targets).
        min_tokens: experts with fewer routed calibration tokens fall back to magnitude (counted in the log).
        modules: ``{qualified name: (experts module, parameter name)}`` instead of looking ``parameters`` up by
            name (an AST model, whose experts modules sit under ``ParamWrapper`` s).
    """
    pruner_cls = get_pruner(method)
    magnitude_cls = get_pruner("magnitude")
    if modules is None:
        names = default_expert_parameters(model) if parameters is None else list(parameters)
        modules = {name: (model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]) for name in names}
    entries = []  # (name, experts module, param, input dim, per-expert pruners)
    for name, (experts, pname) in modules.items():
        param = getattr(experts, pname)
        dim = expert_input_dim(experts, pname, name)
        validate_nm(n, m, in_features=param.shape[dim], module_name=name)
        pruners = [pruner_cls(_expert_view(param, e, dim), f"{name}[{e}]", n, m) for e in range(param.shape[0])]
        entries.append((name, experts, pname, param, dim, pruners))
    tokens: dict[str, torch.Tensor] = {name: torch.zeros(p.shape[0], dtype=torch.long) for name, _, _, p, _, _ in entries}
    if pruner_cls.needs_calibration:
        if calibration_ids is None:
            raise ValueError(f"method={method!r} needs calibration data: pass argument `calibration_ids` (token ids)")
        hooks = []
        by_module: dict[int, list] = {}
        for entry in entries:
            by_module.setdefault(id(entry[1]), []).append(entry)
        for group in by_module.values():
            experts = group[0][1]
            if not supports_routed_inputs(experts):
                logger.warning("one-shot %s: %s is not a use_experts_implementation class; its experts are pruned "
                               "by magnitude", method, group[0][0].rpartition(".")[0])
                for name, *_ in group:
                    tokens[name].fill_(-1)
                continue

            def hook(module, args, kwargs, group=group):
                hidden = args[0] if args else kwargs["hidden_states"]
                index = args[1] if len(args) > 1 else next(v for k, v in kwargs.items() if k != "hidden_states")
                for e, x_e, h_e in routed_expert_inputs(module, hidden, index):
                    for name, _, pname, _, _, pruners in group:
                        pruners[e].add_batch(x_e if pname in UP_PROJECTIONS else h_e)
                        tokens[name][e] += x_e.shape[0]

            hooks.append(experts.register_forward_pre_hook(hook, with_kwargs=True))
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            for batch in as_batches(calibration_ids, batch_size):
                model(input_ids=batch.to(device))
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
    masks, fallbacks, total = {}, 0, 0
    for name, _, _, param, dim, pruners in entries:
        per_expert = []
        for e, pruner in enumerate(pruners):
            total += 1
            if pruner_cls.needs_calibration and int(tokens[name][e]) < min_tokens:
                fallbacks += 1
                pruner = magnitude_cls(pruner.module, pruner.name, n, m)
            mask = pruner.prune()
            pruner.free()
            per_expert.append(mask)  # the view's own layout = the parameter's
        masks[name] = torch.stack(per_expert).to(torch.bool)
    if pruner_cls.needs_calibration:
        logger.info("one-shot %s on fused experts: %d of %d expert matrices had fewer than %d routed calibration "
                    "tokens and were pruned by magnitude", method, fallbacks, total, min_tokens)
    return masks
