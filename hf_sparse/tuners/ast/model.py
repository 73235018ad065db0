"""ASTModel: the PEFT tuner that finds AST targets, wraps them, and decides what is trainable and saved."""

from __future__ import annotations

import logging
import re
from typing import Any, Iterator, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, _ExcludedModule
from torch import nn

from ...targets import DEFAULT_TARGET_MODULES
from .config import ASTConfig
from .layer import ASTLayer, Linear, MaskUpdate, masked_decay_term

logger = logging.getLogger(__name__)

from ...targets import SUPPORTED_MODULE_TYPES as SUPPORTED_TYPES  # noqa: E402


def resolve_targets(model: nn.Module, config: ASTConfig) -> list[str]:
    """Qualified names of the modules AST sparsifies, validated; errors name the module and the argument."""
    return _resolve(model, config)[0]


def _resolve(model: nn.Module, config: ASTConfig) -> tuple[list[str], set[str]]:
    """(targets, names the exclude patterns removed), by the one selector (:mod:`hf_sparse.targets`)."""
    selection = config.target_selector().select(model)
    _log_dense_parameters(model, selection.modules)
    return selection.modules, selection.excluded


def _log_dense_parameters(model: nn.Module, targets: list[str]) -> None:
    """Say which weight matrices inside decoder blocks stay dense (e.g. fused MoE experts, routers)."""
    target_set = set(targets)
    dense = []
    for name, module in model.named_modules():
        if not re.fullmatch(DEFAULT_TARGET_MODULES, name or "") or name in target_set:
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param.dim() >= 2:
                dense.append(f"{name}.{pname} {tuple(param.shape)} ({type(module).__name__})")
    if dense:
        shown = ", ".join(dense[:6]) + (f", ... ({len(dense)} in all)" if len(dense) > 6 else "")
        logger.warning(
            "AST leaves these weight matrices inside decoder blocks dense: %s. Fused MoE expert tensors are 3-D "
            "parameters, not Linear modules, and routers are tiny and routing-critical.",
            shown,
        )


class ASTModel(BaseTuner):
    """Creates an AST (Adaptive Sparse Trainer) model from a transformers model; see :class:`ASTConfig`."""

    prefix: str = "ast_"
    tuner_layer_cls = ASTLayer
    target_module_mapping: dict = {}

    # ---- target selection ----
    def _prepare_adapter_config(self, peft_config: ASTConfig, model_config: dict) -> ASTConfig:
        return peft_config  # targets are resolved against the model in _prepare_model

    def _prepare_model(self, peft_config: ASTConfig, model: nn.Module) -> None:
        targets, excluded = _resolve(model, peft_config)
        self._ast_targets, self._ast_excluded = set(targets), excluded

    def _check_target_module_exists(self, peft_config: ASTConfig, key: str):  # type: ignore[override]
        if key in getattr(self, "_ast_excluded", ()):
            return _ExcludedModule()  # lets PEFT's bookkeeping know exclude_modules did its job
        return key in getattr(self, "_ast_targets", ())

    def _check_new_adapter_config(self, config: ASTConfig) -> None:
        super()._check_new_adapter_config(config)
        if len(self.peft_config) > 1:
            raise ValueError("ASTModel supports one AST adapter per model: the masks apply to the shared dense weight.")

    def _create_and_replace(
        self,
        peft_config: ASTConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, ASTLayer):
            target.update_layer(adapter_name, peft_config, current_key)
            return
        if not isinstance(target, SUPPORTED_TYPES):
            raise TypeError(
                f"{current_key}: argument `target_modules` matched a {type(target).__name__}; AST supports "
                f"nn.Linear and Conv1D"
            )
        new_module = Linear(target, adapter_name, peft_config, module_name=current_key)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        setattr(parent, child_name, new_module)
        if hasattr(child, "base_layer"):
            child = child.base_layer
        if not isinstance(new_module, ASTLayer):  # unloading: nothing to move
            return
        weight = child.weight
        for name, module in new_module.named_modules():
            if self.prefix in name:
                module.to(weight.device)

    # ---- trainability: AST trains the dense target weights themselves ----
    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        config = next(iter(self.peft_config.values()))
        policy = config.trainable_non_target
        for name, param in model.named_parameters():
            if policy == "all":
                param.requires_grad = True
            elif policy == "none":
                param.requires_grad = False
            else:
                param.requires_grad = any(re.fullmatch(p, name) or re.search(p, name) for p in policy)
        for module in model.modules():
            if isinstance(module, ASTLayer):
                base = module.get_base_layer()
                base.weight.requires_grad = True
                if base.bias is not None:
                    base.bias.requires_grad = True
                for slorb in module.ast_slorb.values():
                    slorb.S.requires_grad = True
                    if slorb.X is not None:
                        slorb.X.requires_grad = True

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Masks and SLoRB (PEFT's default) plus the trained dense weights: they are the adapter of AST."""
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        for name, module in model.named_modules():
            if isinstance(module, ASTLayer):
                for pname, _ in module.get_base_layer().named_parameters():
                    trainable.add(f"{name}.base_layer.{pname}")
        for key, value in state_dict.items():
            if key in trainable:
                to_return[key] = value
        return to_return

    # ---- AST helpers used by the trainer and callbacks ----
    def ast_layers(self) -> Iterator[tuple[str, ASTLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, ASTLayer):
                yield name, module

    @torch.no_grad()
    def update_masks(self, scores: Optional[dict[str, torch.Tensor]] = None) -> dict[str, MaskUpdate]:
        """Recompute every target's mask (from |W|, or ``scores[name]``); returns the flips per module."""
        scores = scores or {}
        return {name: layer.update_mask(scores.get(name)) for name, layer in self.ast_layers()}

    @torch.no_grad()
    def apply_masked_decay(self, lam: float, to_grad: bool = True) -> None:
        """Add ``λ·(¬mask ⊙ W)`` to each target weight's gradient (or subtract it from the weight)."""
        for _, layer in self.ast_layers():
            weight = layer.get_base_layer().weight
            term = masked_decay_term(weight, layer.ast_mask[layer.active_adapters[0]], lam)
            if to_grad:
                weight.grad = term.to(weight.dtype) if weight.grad is None else weight.grad.add_(term.to(weight.grad.dtype))
            else:
                weight.data.sub_(term.to(weight.dtype))


def find_ast_model(model: nn.Module) -> tuple["ASTModel", ASTConfig]:
    """The ASTModel (PEFT tuner) inside ``model`` and its config: ``model`` is a PeftModel (``.base_model`` is the
    tuner, as PEFT's ``get_base_model`` convention has it), the tuner itself, or either wrapped by DDP/accelerate
    (unwrapped with accelerate's ``extract_model_from_parallel``)."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    tuner = inner if isinstance(inner, ASTModel) else getattr(inner, "base_model", None)
    if not isinstance(tuner, ASTModel):
        raise TypeError(
            f"AST callbacks need an AST PEFT model (peft.get_peft_model(model, hf_sparse.ASTConfig())), "
            f"got {type(model).__name__}"
        )
    return tuner, next(iter(tuner.peft_config.values()))
