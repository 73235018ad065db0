"""``prune_oneshot``: one-shot N:M pruning of a causal LM's decoder-block weights (magnitude, Wanda, SparseGPT)."""

from __future__ import annotations

import logging
from typing import Optional, Union

import torch
from torch import nn

from ..sparsity.nm import input_dim_of, validate_nm
from ..targets import TargetSelector
from ..calibration import CalibrationIds, as_batches
from .registry import get_pruner
from .sequential import prune_sequential

logger = logging.getLogger(__name__)

__all__ = ["prune_oneshot", "select_targets"]


def select_targets(
    model: nn.Module,
    target_modules: Optional[Union[str, list[str]]] = None,
    exclude_modules: Optional[Union[str, list[str]]] = None,
    n: int = 2,
    m: int = 4,
) -> dict[str, nn.Module]:
    """The modules AST would sparsify with the same arguments (the one selector, :mod:`hf_sparse.targets`: every
    Linear/Conv1D inside the decoder blocks, MoE routers excluded), validated for N:M; name -> module."""
    validate_nm(n, m, module_name="prune_oneshot")
    modules = dict(model.named_modules())
    targets = {}
    for name in TargetSelector(target_modules, exclude_modules).select(model).modules:
        module = modules[name]
        validate_nm(n, m, in_features=module.weight.shape[input_dim_of(module)], module_name=name)
        targets[name] = module
    return targets


@torch.no_grad()
def prune_oneshot(
    model: nn.Module,
    method: str,
    calibration_ids: Optional[CalibrationIds] = None,
    n: int = 2,
    m: int = 4,
    target_modules: Optional[Union[str, list[str]]] = None,
    exclude_modules: Optional[Union[str, list[str]]] = None,
    batch_size: int = 8,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    experts: bool = False,
) -> dict[str, torch.Tensor]:
    """Prune ``model``'s target weights to exact N:M in place; returns the bool keep-masks by module name.

    ``experts=True`` also prunes the fused MoE expert parameters (AST's default ``target_parameters``) after the
    linears, with statistics per expert from its routed calibration tokens
    (:func:`hf_sparse.oneshot.experts.prune_experts_oneshot`); their masks are keyed by parameter name.

    Args:
        model: a transformers causal LM (Linear or GPT-2 Conv1D projections in decoder blocks).
        method: a registered pruner: ``"magnitude"`` (no data), ``"wanda"``, ``"sparsegpt"`` (updates kept weights).
        calibration_ids: token ids ([num_samples, seq_len] tensor or a list of tensors); ``None`` only for magnitude.
        n, m: keep ``n`` of every ``m`` consecutive input weights of each output row.
        target_modules, exclude_modules: as in :class:`hf_sparse.ASTConfig` (default: AST's targets).
        batch_size: calibration sequences per forward.
        device: where the layers run (default: where the model is); layers move there one at a time.
        progress: show a tqdm bar over the decoder layers.

    Returns:
        ``{qualified module name: bool mask in the weight's own layout (True = kept)}``; pruned entries of each
        weight are stored as exact zeros.
    """
    pruner_cls = get_pruner(method)
    targets = select_targets(model, target_modules, exclude_modules, n, m)
    new_pruner = lambda module, name: pruner_cls(module, name, n, m)  # noqa: E731
    if not pruner_cls.needs_calibration:
        masks = {}
        for name, module in targets.items():
            pruner = new_pruner(module, name)
            masks[name] = pruner.prune()
    else:
        if calibration_ids is None:
            raise ValueError(f"method={method!r} needs calibration data: pass argument `calibration_ids` (token ids)")
        batches = as_batches(calibration_ids, batch_size)
        masks = prune_sequential(model, targets, new_pruner, batches, device=device, progress=progress)
    if experts:  # one pass through the model whose linears are pruned now
        from .experts import prune_experts_oneshot

        masks.update(prune_experts_oneshot(model, method, calibration_ids, n, m, batch_size=batch_size))
    return masks
