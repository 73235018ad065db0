"""The AST tuner layer: a trainable dense weight seen through a recomputable N:M mask.

Forward uses ``W ⊙ mask`` with a straight-through gradient, so pruned weights keep learning and
can come back when the mask is recomputed. Masks are bool buffers (``~mask`` is a logical not;
the reference code's int mask turned the masked decay into a sign-flipped decay of every weight).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...sparsity.nm import nm_mask, validate_nm
from ...sparsity.scores import magnitude_score
from ...modules.slorb import SLoRB, slorb_mean_init
from ...modules.sparse_linear import SparseLinear, linear_forward

__all__ = [
    "ASTLayer",
    "MaskUpdate",
    "masked_decay_term",
    "masked_weight_ste",
]


class _MaskedWeightSTE(torch.autograd.Function):
    """Forward ``weight * mask`` (in ``dtype``); backward hands the effective weight's gradient to the dense weight."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # noqa: D401
        ctx.weight_dtype = weight.dtype
        if dtype == weight.dtype:
            return weight * mask
        # cast first, then mask in place: one pass over the fp32 weight instead of two (mixed precision)
        return weight.to(dtype).mul_(mask)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad_output.to(ctx.weight_dtype), None, None


def masked_weight_ste(weight: torch.Tensor, mask: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``weight ⊙ mask`` (cast to ``dtype``) whose gradient w.r.t. ``weight`` is the gradient w.r.t. the result.

    ``dtype`` defaults to the autocast dtype when autocast is on for the weight's device (what the matmul would cast
    to anyway), else the weight's own dtype.
    """
    if dtype is None:
        dtype = weight.dtype
        device_type = weight.device.type
        if weight.is_floating_point() and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
    return _MaskedWeightSTE.apply(weight, mask, dtype)


def masked_decay_term(weight: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """SR-STE's extra decay ``λ·(¬mask ⊙ W)``: non-zero only on pruned weights (mask must be bool)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"masked_decay_term needs a bool mask (got {mask.dtype}); ~int is bitwise, not logical")
    return weight.detach() * (~mask) * lam


@dataclass
class MaskUpdate:
    """Result of a mask recompute: how many entries flipped vs the previous and vs the initial mask."""

    flipped_vs_previous: int
    flipped_vs_initial: int
    numel: int

    @property
    def flip_rate(self) -> float:
        return self.flipped_vs_previous / max(self.numel, 1)

    @property
    def flip_rate_initial(self) -> float:
        return self.flipped_vs_initial / max(self.numel, 1)




class ASTLayer(BaseTunerLayer):
    """PEFT tuner layer holding, per adapter, the current and initial N:M masks and an optional SLoRB branch."""

    adapter_layer_names = ("ast_slorb",)
    other_param_names = ("ast_mask", "ast_initial_mask", "ast_nm")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.ast_slorb = nn.ModuleDict({})
        self.ast_mask = BufferDict({}, persistent=True)
        self.ast_initial_mask = BufferDict({}, persistent=True)
        self.ast_nm: dict[str, tuple[int, int]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._pruned_backup: dict[str, torch.Tensor] = {}
        base = self.get_base_layer()
        if isinstance(base, Conv1D):
            self.fan_in_fan_out = True
            self.in_features, self.out_features = base.weight.shape
        elif isinstance(base, nn.Linear):
            self.fan_in_fan_out = False
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            raise TypeError(f"AST supports nn.Linear and Conv1D, got {type(base).__name__}")
        self.kwargs = kwargs

    # ---- layout helpers: masks are stored in the weight's own layout; N:M groups run along the input dim ----
    @property
    def input_dim(self) -> int:
        return 0 if self.fan_in_fan_out else 1

    def _out_in(self, t: torch.Tensor) -> torch.Tensor:
        return t.t() if self.fan_in_fan_out else t

    def update_layer(self, adapter_name: str, config: Any, module_name: str, mask: Optional[torch.Tensor] = None):
        """Create the adapter's masks (from |W| unless ``mask`` is given) and its SLoRB branch."""
        validate_nm(config.n, config.m, in_features=self.in_features, module_name=module_name)
        weight = self.get_base_layer().weight
        self.ast_nm[adapter_name] = (config.n, config.m)
        if mask is None:
            if weight.device.type == "meta":
                mask = torch.ones_like(weight, dtype=torch.bool, device="meta")
            else:
                mask = nm_mask(magnitude_score(weight), config.n, config.m, dim=self.input_dim)
        self.ast_mask[adapter_name] = mask.to(torch.bool)
        self.ast_initial_mask[adapter_name] = mask.to(torch.bool).clone()
        if config.use_slorb:
            if self.in_features % config.slorb_group_size:
                raise ValueError(
                    f"{module_name}: in_features={self.in_features} is not divisible by argument "
                    f"`slorb_group_size`={config.slorb_group_size}"
                )
            slorb = SLoRB(self.in_features, self.out_features, config.slorb_group_size, config.slorb_train_projection)
            if config.slorb_init == "mean" and weight.device.type != "meta":
                with torch.no_grad():
                    slorb.S.copy_(slorb_mean_init(self._out_in(weight), self._out_in(mask), config.slorb_group_size))
            self.ast_slorb[adapter_name] = slorb.to(weight.device)
        self.set_adapter(self.active_adapters)

    # ---- mask maintenance (driven by the trainer's callbacks) ----
    @torch.no_grad()
    def update_mask(self, score: Optional[torch.Tensor] = None, adapter_name: Optional[str] = None) -> MaskUpdate:
        """Recompute the mask from |W| (or ``score``, weight layout) and count flips vs previous and initial."""
        name = adapter_name or self.active_adapters[0]
        n, m = self.ast_nm[name]
        weight = self.get_base_layer().weight
        score = magnitude_score(weight) if score is None else score
        if score.shape != weight.shape:
            raise ValueError(f"score shape {tuple(score.shape)} != weight shape {tuple(weight.shape)}")
        new = nm_mask(score, n, m, dim=self.input_dim)
        old = self.ast_mask[name]
        update = MaskUpdate(
            flipped_vs_previous=int((new != old).sum()),
            flipped_vs_initial=int((new != self.ast_initial_mask[name]).sum()),
            numel=new.numel(),
        )
        old.copy_(new)
        return update

    def effective_weight(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """The N:M weight the forward uses (with STE gradient)."""
        name = adapter_name or self.active_adapters[0]
        return masked_weight_ste(self.get_base_layer().weight, self.ast_mask[name])

    # ---- forward ----
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        active = [a for a in self.active_adapters if a in self.ast_mask]
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            out = self.base_layer(x, *args, **kwargs)
        elif active:
            out = linear_forward(x, self.effective_weight(active[0]), base.bias, self.fan_in_fan_out)
        else:
            return self.base_layer(x, *args, **kwargs)
        for name in active:
            if name in self.ast_slorb:
                out = out + self.ast_slorb[name](x).to(out.dtype)
        return out

    # ---- merging ----
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write ``W ⊙ mask`` into the base weight (zeros stored); SLoRB stays a separate branch."""
        names = adapter_names or [a for a in self.active_adapters if a in self.ast_mask]
        for name in names:
            if name in self.merged_adapters:
                continue
            weight = self.get_base_layer().weight
            mask = self.ast_mask[name]
            with torch.no_grad():
                merged = weight.data * mask
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs/infs detected while merging AST adapter {name!r}")
                self._pruned_backup[name] = weight.data * (~mask)
                weight.data.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                self.get_base_layer().weight.data.add_(self._pruned_backup.pop(name))

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> nn.Module:
        """Called by PEFT's ``merge_and_unload``/``unload``: the base module, or a SparseLinear when SLoRB exists."""
        if not merge:
            return self.get_base_layer()
        self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        names = adapter_names or self.merged_adapters
        slorbs = [self.ast_slorb[n] for n in names if n in self.ast_slorb]
        base = self.get_base_layer()
        if not slorbs:
            return base
        return SparseLinear(base.weight, base.bias, slorbs[0], self.fan_in_fan_out)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Change that merging writes into the base weight (minus the pruned values)."""
        weight = self.get_base_layer().weight
        return -(weight.detach() * (~self.ast_mask[adapter_name]))

    def __repr__(self) -> str:
        return "ast." + super().__repr__()


class Linear(nn.Module, ASTLayer):
    """AST wrapper for ``nn.Linear`` and GPT-2's ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, module_name: str, **kwargs: Any):
        super().__init__()
        ASTLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name, mask=kwargs.get("mask"))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return ASTLayer.forward(self, x, *args, **kwargs)
