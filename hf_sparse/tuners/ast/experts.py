"""AST for fused MoE expert tensors: PEFT's ``ParamWrapper`` convention (``LoraConfig(target_parameters=...)``).

transformers 5 keeps a layer's routed experts as 3-D parameters (``mlp.experts.gate_up_proj`` ``[E, ., .]``) and lets
``@use_experts_implementation`` swap the experts' forward (eager loop, batched/grouped matmuls). So the mask acts on
the parameter itself, not on one forward: while the wrapper runs, the experts module's attribute of that name is
``W ⊙ mask`` (straight-through gradient, computed once per forward; an instance attribute that shadows the
registered parameter), so whichever experts implementation runs reads the masked tensor from the module. The
``nn.Parameter`` stays registered and untouched (optimizers, DDP hooks, state dicts see the dense weight).

As in PEFT, one wrapper adapts one parameter; two targeted parameters of the same experts module nest two wrappers
(the class is named ``ParamWrapper`` because PEFT's injection recognises nested wrappers by that class name). Masks are
bool ``[E, ., .]`` buffers, N:M along each expert matrix's *input* dimension (:mod:`hf_sparse.sparsity.experts`).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence, Union

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...sparsity.experts import expert_input_dim
from ...sparsity.nm import nm_mask, validate_nm
from ...sparsity.scores import magnitude_score
from .layer import MaskUpdate, init_masks, masked_weight_ste, replace_mask

__all__ = ["ParamWrapper", "expert_param_wrappers"]


class ParamWrapper(nn.Module, BaseTunerLayer):
    """AST wrapper of one fused expert parameter (``parameter_name``) of an experts module (``base_layer``)."""

    adapter_layer_names = ()  # nothing but masks: SLoRB per expert is refused (ASTConfig.use_slorb)
    other_param_names = ("ast_mask", "ast_initial_mask", "ast_nm")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, parameter_name: str, module_name: str,
                 **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        self.ast_mask = BufferDict({}, persistent=True)
        self.ast_initial_mask = BufferDict({}, persistent=True)
        self.ast_nm: dict[str, tuple[int, int]] = {}
        self.ast_slorb = nn.ModuleDict({})  # always empty; the tuner's trainability loop reads it
        self.ast_cast_scale = nn.ParameterDict({})  # always empty: schedule="progressive" is refused for experts
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._pruned_backup: dict[str, torch.Tensor] = {}
        self._active_adapter = adapter_name
        self._ast_module_name = module_name  # the qualified parameter name, for errors and metrics
        self.input_dim = expert_input_dim(self.get_base_layer(), parameter_name, module_name)
        self.num_experts = int(self.get_param().shape[0])
        self.kwargs = kwargs
        self.update_layer(adapter_name, config, module_name)

    # ---- the wrapped parameter ----
    def get_param(self) -> nn.Parameter:
        return getattr(self.get_base_layer(), self.parameter_name)

    @property
    def in_features(self) -> int:
        return int(self.get_param().shape[self.input_dim])

    @property
    def out_features(self) -> int:
        return int(self.get_param().shape[3 - self.input_dim])

    def update_layer(self, adapter_name: str, config: Any, module_name: str, mask: Optional[torch.Tensor] = None):
        """Create the adapter's per-expert masks (from |W| unless ``mask`` is given)."""
        validate_nm(config.n, config.m, in_features=self.in_features, module_name=module_name)
        if config.use_slorb:
            raise ValueError(
                f"{module_name}: SLoRB is not implemented for fused MoE expert parameters (argument `use_slorb`=True); "
                "pass ASTConfig(use_slorb=False), or target_parameters=[] to keep the experts dense"
            )
        if getattr(config, "schedule", "ast") != "ast":
            raise ValueError(
                f"{module_name}: ASTConfig(schedule={config.schedule!r}) is not implemented for fused MoE expert "
                "parameters; use schedule='ast', or target_parameters=[] to keep the experts dense"
            )
        init_masks(self, adapter_name, self.get_param(), config, mask)
        self.set_adapter(self.active_adapters)

    # ---- trainability: the expert weights are what AST trains ----
    def _set_base_requires_grad(self, requires_grad: bool) -> None:
        self.get_param().requires_grad = requires_grad

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        if names & set(self.ast_mask):
            self._set_base_requires_grad(requires_grad)

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        if inference_mode:
            self._set_base_requires_grad(False)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        param = self.get_param()
        if param.device.type == "meta":
            return
        for store in (self.ast_mask, self.ast_initial_mask):
            if adapter_name in store and store[adapter_name].device.type != "meta":
                store[adapter_name] = store[adapter_name].to(param.device)

    # ---- masks ----
    def _active(self) -> Optional[str]:
        return next((a for a in self.active_adapters if a in self.ast_mask), None)

    @torch.no_grad()
    def update_mask(self, score: Optional[torch.Tensor] = None, adapter_name: Optional[str] = None,
                    keep_experts: Optional[torch.Tensor] = None) -> MaskUpdate:
        """Recompute every expert's mask from |W| (or ``score``, the parameter's shape); ``keep_experts`` (bool
        ``[E]``) leaves those experts' masks as they are (e.g. experts that received no tokens)."""
        name = adapter_name or self._active() or self.active_adapters[0]
        n, m = self.ast_nm[name]
        param = self.get_param()
        score = magnitude_score(param) if score is None else score
        if score.shape != param.shape:
            raise ValueError(f"{self._ast_module_name}: score shape {tuple(score.shape)} != {tuple(param.shape)}")
        new = nm_mask(score, n, m, dim=self.input_dim)
        old = self.ast_mask[name]
        if keep_experts is not None:
            new[keep_experts.to(new.device)] = old[keep_experts.to(old.device)]
        return replace_mask(old, new, self.ast_initial_mask[name])

    def effective_weight(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        name = adapter_name or self._active() or self.active_adapters[0]
        param = self.get_param()
        return masked_weight_ste(param, self.ast_mask[name], dtype=param.dtype)

    # ---- forward: the experts module computes with the masked parameter, whatever its implementation ----
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        active = self._active()
        if self.merged or active is None:
            return self.base_layer(*args, **kwargs)
        experts = self.get_base_layer()
        param = self.get_param()
        # an instance attribute shadows the registered parameter for attribute reads (nn.Module finds parameters in
        # __getattr__, after __dict__), so every experts implementation reads W ⊙ M, computed once per forward. The
        # Parameter itself stays registered and untouched (a torch parametrization would `set_` it, which detaches
        # DDP's gradient hooks from it: measured, expert gradients were not all-reduced).
        masked = masked_weight_ste(param, self.ast_mask[active], dtype=param.dtype)
        object.__setattr__(experts, self.parameter_name, masked)
        try:
            return self.base_layer(*args, **kwargs)
        finally:
            experts.__dict__.pop(self.parameter_name, None)

    # ---- merging ----
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write ``W ⊙ mask`` into the expert parameter (exact zeros stored)."""
        for name in [a for a in check_adapters_to_merge(self, adapter_names) if a in self.ast_mask]:
            param = self.get_param()
            mask = self.ast_mask[name]
            with torch.no_grad():
                merged = param.data * mask
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(
                        f"{self._ast_module_name}: NaNs detected in the merged weights. The adapter {name} seems to be "
                        "broken (non-finite values in the masked expert weight)"
                    )
                self._pruned_backup[name] = param.data * (~mask)
                param.data.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                self.get_param().data.add_(self._pruned_backup.pop(name))

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool,
                                           adapter_names: Optional[list[str]]) -> nn.Module:
        """PEFT's ``merge_and_unload``/``unload``: merge this and every nested wrapper, return the experts module."""
        base: nn.Module = self
        while isinstance(base, ParamWrapper):
            if merge:
                requested = adapter_names or [a for a in base.active_adapters if a in base.ast_mask]
                pending = [a for a in requested if a not in base.merged_adapters]
                if pending:  # after merge_adapter() nothing is left to merge: no "already merged" warning
                    base.merge(safe_merge=safe_merge, adapter_names=pending)
            base = base.base_layer
        return base

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        param = self.get_param()
        return -(param.detach() * (~self.ast_mask[adapter_name]))

    def extra_repr(self) -> str:
        return f"{self.parameter_name}: {self.num_experts} experts, N:M along dim {self.input_dim}"

    def __repr__(self) -> str:
        return "ast." + super().__repr__()


def expert_param_wrappers(model: nn.Module) -> list[tuple[str, ParamWrapper]]:
    """``(qualified parameter name, wrapper)`` for every AST expert wrapper in ``model``."""
    return [(m._ast_module_name, m) for m in model.modules() if isinstance(m, ParamWrapper)]
