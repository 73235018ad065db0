"""One-shot mask initialisation of an AST model (``ASTConfig(mask_init="wanda" | "sparsegpt")``).

The one-shot method runs on the dense weights under the AST layers (adapters disabled, so layers not yet
processed are dense and processed ones are pruned, as in standalone pruning). Afterwards each AST layer's
current and initial masks are the one-shot masks. The dense weights keep their pruned entries (AST's STE may
bring them back); for SparseGPT the kept entries take the updated values. SLoRB's S is re-initialised from the
new mask when ``slorb_init="mean"``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import TrainerCallback

from ..calibration import CalibrationIds, as_batches
from ..oneshot.registry import PRUNERS, get_pruner
from ..oneshot.sequential import prune_sequential
from ..tuners.ast.model import find_ast_model

logger = logging.getLogger(__name__)

__all__ = ["initialize_ast_masks", "set_ast_masks", "ASTOneShotInitCallback", "ast_masks_need_init"]

_DONE_ATTR = "_hf_sparse_mask_init_done"


def _ast_model(model: nn.Module):
    return find_ast_model(model)


@torch.no_grad()
def initialize_ast_masks(
    peft_model: nn.Module,
    method: str,
    calibration_ids: Optional[CalibrationIds] = None,
    batch_size: int = 8,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Set every AST layer's mask and initial mask from one-shot ``method``; returns the masks by layer name.

    Args:
        peft_model: an AST PEFT model (``peft.get_peft_model(model, ASTConfig(...))``), possibly DDP-wrapped.
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"`` (any registered pruner).
        calibration_ids: token ids; not needed for magnitude.
    """
    ast_model, config = _ast_model(peft_model)
    pruner_cls = get_pruner(method)
    layers = dict(ast_model.ast_layers())
    if not layers:
        raise ValueError("initialize_ast_masks: the model has no AST layers")
    bases = {name: layer.get_base_layer() for name, layer in layers.items()}
    n, m = config.n, config.m
    new_pruner = lambda module, name: pruner_cls(module, name, n, m)  # noqa: E731
    was_enabled = not any(layer.disable_adapters for layer in layers.values())
    requires_grad = {id(p): p.requires_grad for p in ast_model.parameters()}  # PEFT's toggles change them
    ast_model.disable_adapter_layers()  # layers run dense; processed ones hold their pruned weights meanwhile
    try:
        if pruner_cls.needs_calibration:
            if calibration_ids is None:
                raise ValueError(f"mask_init={method!r} needs calibration data: pass argument `calibration_ids`")
            batches = as_batches(calibration_ids, batch_size)
            masks = prune_sequential(
                ast_model.model, bases, new_pruner, batches, device=device, restore_pruned=True, progress=progress
            )
        else:
            masks = {}
            for name, base in bases.items():
                original = base.weight.detach().clone()
                masks[name] = new_pruner(base, name).prune()
                base.weight.data.copy_(original)
        if ast_model.ast_expert_layers() and pruner_cls.needs_calibration:  # adapters still off: a dense forward
            _init_expert_masks(ast_model, method, calibration_ids, batch_size, n, m)
    finally:
        if was_enabled:
            ast_model.enable_adapter_layers()
        for p in ast_model.parameters():
            p.requires_grad_(requires_grad[id(p)])
    set_ast_masks(peft_model, masks, source=f"one-shot {method}")
    setattr(ast_model, _DONE_ATTR, method)
    return masks


@torch.no_grad()
def _init_expert_masks(ast_model: Any, method: str, calibration_ids: Any, batch_size: int, n: int, m: int) -> None:
    """One-shot masks per expert from the routed calibration tokens (:func:`hf_sparse.oneshot.prune_experts_oneshot`)
    become the expert wrappers' masks; as for the linears, the dense weights keep their pruned entries (AST may
    bring them back) and the kept ones take the one-shot values (SparseGPT's updates)."""
    from ..oneshot.experts import prune_experts_oneshot

    wrappers = dict(ast_model.ast_expert_layers())
    modules = {name: (w.get_base_layer(), w.parameter_name) for name, w in wrappers.items()}
    originals = {name: w.get_param().detach().clone() for name, w in wrappers.items()}
    masks = prune_experts_oneshot(ast_model.model, method, calibration_ids, n, m, batch_size=batch_size,
                                  modules=modules)
    for name, wrapper in wrappers.items():
        param, adapter = wrapper.get_param(), wrapper.active_adapters[0]
        mask = masks[name].to(param.device)
        param.data.copy_(torch.where(mask, param.data, originals[name]))
        wrapper.ast_mask[adapter].copy_(mask)
        wrapper.ast_initial_mask[adapter].copy_(mask)


@torch.no_grad()
def set_ast_masks(peft_model: nn.Module, masks: dict[str, torch.Tensor], source: str = "given") -> None:
    """Make ``masks`` (by layer name) every AST layer's current and initial mask, validated exact N:M.

    With SLoRB and ``slorb_init="mean"``, S is re-initialised from the pruned weights under the new mask.
    """
    from ..sparsity.nm import nm_violations
    from ..modules import slorb_mean_init

    ast_model, config = _ast_model(peft_model)
    n, m = config.n, config.m
    for name, layer in ast_model.ast_layers():
        if name not in masks:
            raise KeyError(f"set_ast_masks: no {source} mask for AST layer {name!r}")
        adapter = layer.active_adapters[0]
        mask = masks[name].to(device=layer.ast_mask[adapter].device, dtype=torch.bool)
        if mask.shape != layer.ast_mask[adapter].shape:
            raise ValueError(f"{name}: {source} mask shape {tuple(mask.shape)} != {tuple(layer.ast_mask[adapter].shape)}")
        if nm_violations(mask, n, m, dim=layer.input_dim) or int(mask.sum()) * m != mask.numel() * n:
            raise RuntimeError(f"{name}: {source} mask is not exact {n}:{m}")
        layer.ast_mask[adapter].copy_(mask)
        layer.ast_initial_mask[adapter].copy_(mask)
        if adapter in layer.ast_slorb and config.slorb_init == "mean":
            weight = layer.get_base_layer().weight
            layer.ast_slorb[adapter].weight.copy_(
                slorb_mean_init(layer._out_in(weight), layer._out_in(mask), config.slorb_group_size))


def ast_masks_need_init(model: nn.Module) -> Optional[str]:
    """The one-shot method still to apply to ``model``'s AST masks, or ``None``.

    ``None`` for ``mask_init="magnitude"``, after :func:`initialize_ast_masks` ran on this model, and when the
    masks are not the fresh wrapper's (initial mask = current mask = magnitude mask of the current weights):
    masks loaded from a trained adapter are never overwritten.
    """
    from ..sparsity.nm import nm_mask
    from ..sparsity.scores import magnitude_score

    ast_model, config = _ast_model(model)
    method = getattr(config, "mask_init", "magnitude") or "magnitude"
    if method not in PRUNERS:
        raise ValueError(f"ASTConfig: argument `mask_init`={method!r} is not one of {sorted(PRUNERS)}")
    if method == "magnitude" or getattr(ast_model, _DONE_ATTR, None) == method:
        return None
    with torch.no_grad():
        for name, layer in ast_model.ast_layers():
            adapter = layer.active_adapters[0]
            n, m = layer.ast_nm[adapter]
            mask, initial = layer.ast_mask[adapter], layer.ast_initial_mask[adapter]
            weight = layer.get_base_layer().weight
            if weight.device.type == "meta":
                return None
            fresh = torch.equal(mask, initial) and torch.equal(
                initial, nm_mask(magnitude_score(weight), n, m, dim=layer.input_dim)
            )
            if not fresh:
                logger.info("AST: %s already has a non-magnitude mask; mask_init=%r is not applied", name, method)
                return None
    return method


def _calibration_from_dataloader(dataloader: Any, num_samples: int) -> list[torch.Tensor]:
    """The first ``num_samples`` sequences of the train dataloader (input_ids, padding trimmed per row)."""
    rows: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=[]):  # iterating must not shift the training data order
        for batch in dataloader:
            ids = batch["input_ids"].detach().cpu()
            mask = batch.get("attention_mask")
            for i in range(ids.shape[0]):
                row = ids[i] if mask is None else ids[i][mask[i].cpu().bool()]
                if row.numel():
                    rows.append(row)
                if len(rows) >= num_samples:
                    return rows
    return rows


def _broadcast_masks(ast_model: Any) -> None:
    """Under DDP every rank saw other calibration data: take rank 0's masks and weights everywhere."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for _, layer in ast_model.ast_layers():
        adapter = layer.active_adapters[0]
        for tensor in (layer.ast_mask[adapter], layer.ast_initial_mask[adapter], layer.get_base_layer().weight.data):
            torch.distributed.broadcast(tensor, src=0)
        if adapter in layer.ast_slorb:
            torch.distributed.broadcast(layer.ast_slorb[adapter].weight.data, src=0)
    for _, wrapper in ast_model.ast_expert_layers():  # fused MoE expert parameters
        adapter = wrapper.active_adapters[0]
        for tensor in (wrapper.ast_mask[adapter], wrapper.ast_initial_mask[adapter], wrapper.get_param().data):
            torch.distributed.broadcast(tensor, src=0)


class ASTOneShotInitCallback(TrainerCallback):
    """At the start of a fresh (not resumed) training run, apply ``ASTConfig.mask_init`` once.

    Calibration: the first ``args.ast_calibration_samples`` sequences of the train dataloader. On resume the
    masks come from the checkpoint and nothing happens.
    """

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs: Any):
        if model is None or state.global_step > 0:
            return control
        method = ast_masks_need_init(model)
        if method is None:
            return control
        ast_model, _ = _ast_model(model)
        ids = None
        if get_pruner(method).needs_calibration:
            if train_dataloader is None:
                raise ValueError(
                    f"mask_init={method!r} needs calibration data, but the Trainer has no train dataloader"
                )
            num = int(getattr(args, "ast_calibration_samples", 32))
            # sorted by length: equal-length rows are stacked into batches by as_batches
            ids = sorted(_calibration_from_dataloader(train_dataloader, num), key=len)
        logger.info("AST: initialising masks with one-shot %s", method)
        batch_size = max(1, int(getattr(args, "per_device_train_batch_size", 8)))
        progress = not getattr(args, "disable_tqdm", False)
        initialize_ast_masks(model, method, ids, batch_size=batch_size, progress=progress)
        _broadcast_masks(ast_model)
        return control

