"""The AST tuner layer: a trainable dense weight seen through a recomputable N:M mask.

Forward uses ``W ⊙ mask`` with a straight-through gradient, so pruned weights keep learning and
can come back when the mask is recomputed. Masks are bool buffers (``~mask`` is a logical not;
the reference code's int mask turned the masked decay into a sign-flipped decay of every weight).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...sparsity.nm import nm_mask, validate_nm
from ...sparsity.scores import magnitude_score
from ...modules.slorb import SLoRB, slorb_mean_init
from ...modules.sparse_linear import SparseLinear, linear_forward
from .progressive import cast_weight, init_progressive, is_dense_phase

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
    mask = _mask_like_weight(weight, mask)
    return _MaskedWeightSTE.apply(weight, mask, dtype)


def _mask_like_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FSDP2: the mask is a row-sharded DTensor (hf_sparse.training.fsdp). Inside the FSDP forward the weight is
    the gathered full tensor: all-gather the mask too (transient, 1 byte per weight). A sharded weight meets a plain
    full mask only if the masks were never sharded: refuse rather than mix Tensor and DTensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(mask, DTensor) and not isinstance(weight, DTensor):
        return mask.full_tensor()
    if isinstance(weight, DTensor) and not isinstance(mask, DTensor):
        raise RuntimeError(
            "AST layer: the weight is an FSDP2-sharded DTensor but its mask is a plain tensor; shard the masks with "
            "hf_sparse.training.fsdp.shard_ast_masks (ASTTrainer does) or call this inside the FSDP forward"
        )
    return mask


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


def init_masks(layer: Any, adapter_name: str, weight: torch.Tensor, config: Any,
               mask: Optional[torch.Tensor] = None) -> None:
    """The adapter's current and initial masks: ``mask`` if given, else N:M by |W| (all-True on the meta device,
    where the weights come with the load). Shared by the Linear layers and the fused-expert wrappers."""
    layer.ast_nm[adapter_name] = (config.n, config.m)
    if mask is None:
        if weight.device.type == "meta":
            mask = torch.ones_like(weight, dtype=torch.bool, device="meta")
        else:
            mask = nm_mask(magnitude_score(weight), config.n, config.m, dim=layer.input_dim)
    # contiguous: a Conv1D mask comes out as a transposed view, which safetensors refuses to save
    layer.ast_mask[adapter_name] = mask.to(torch.bool).contiguous()
    layer.ast_initial_mask[adapter_name] = layer.ast_mask[adapter_name].clone()


def replace_mask(mask: torch.Tensor, new: torch.Tensor, initial: torch.Tensor) -> MaskUpdate:
    """Write ``new`` into the mask buffer in place (buffers keep their identity: FSDP/DDP hold them) and count flips."""
    update = MaskUpdate(
        flipped_vs_previous=int((new != mask).sum()),
        flipped_vs_initial=int((new != initial).sum()),
        numel=new.numel(),
    )
    mask.copy_(new)
    return update


class ASTLayer(BaseTunerLayer):
    """PEFT tuner layer holding, per adapter, the current and initial N:M masks and an optional SLoRB branch."""

    # PEFT's per-adapter containers. AST also trains the base layer's own weight and bias, which no container holds:
    # set_requires_grad / set_adapter(inference_mode=True) below extend PEFT's toggles to them.
    adapter_layer_names = ("ast_slorb", "ast_cast_scale")
    other_param_names = ("ast_mask", "ast_initial_mask", "ast_nm", "ast_cast_dense")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.ast_slorb = nn.ModuleDict({})
        # schedule="progressive" (hf_sparse.tuners.ast.progressive): per-half-row scales, dense-forward flag
        self.ast_cast_scale = nn.ParameterDict({})
        self.ast_cast_dense = BufferDict({}, persistent=True)
        self.ast_mask = BufferDict({}, persistent=True)
        self.ast_initial_mask = BufferDict({}, persistent=True)
        self.ast_nm: dict[str, tuple[int, int]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._pruned_backup: dict[str, torch.Tensor] = {}
        self._ast_module_name = "<AST layer>"  # qualified name, for errors (set by update_layer)
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
        self._ast_module_name = module_name
        weight = self.get_base_layer().weight
        init_masks(self, adapter_name, weight, config, mask)
        if config.use_slorb:
            if self.in_features % config.slorb_group_size:
                raise ValueError(
                    f"{module_name}: in_features={self.in_features} is not divisible by argument "
                    f"`slorb_group_size`={config.slorb_group_size}"
                )
            slorb = SLoRB(self.in_features, self.out_features, config.slorb_group_size, config.slorb_train_projection)
            if config.slorb_init == "mean" and weight.device.type != "meta":
                with torch.no_grad():
                    mask = self.ast_mask[adapter_name]
                    slorb.weight.copy_(slorb_mean_init(self._out_in(weight), self._out_in(mask), config.slorb_group_size))
            self.ast_slorb[adapter_name] = slorb
            # device and dtype of the base weight (PEFT's autocast_adapter_dtype then upcasts fp16/bf16 to fp32 unless
            # it is False); skipped while the branch is on meta (low_cpu_mem_usage: the weights come with the load)
            self._move_adapter_to_device_of_base_layer(adapter_name)
        if getattr(config, "schedule", "ast") == "progressive":
            init_progressive(self, adapter_name, config, module_name)
        self.set_adapter(self.active_adapters)

    # ---- trainability: the base weight and bias are part of the adapter ----
    def _set_base_requires_grad(self, requires_grad: bool) -> None:
        for param in self.get_base_layer().parameters(recurse=False):
            param.requires_grad = requires_grad

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """PEFT's toggle (SLoRB), extended to the base weight and bias that AST trains."""
        super().set_requires_grad(adapter_names, requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        if names & set(self.ast_mask):
            self._set_base_requires_grad(requires_grad)

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        """PEFT's activation; ``inference_mode=True`` also freezes the base weight and bias (never unfreezes them:
        what trains is decided at injection, by ``set_requires_grad`` and by the tuner's trainability policy)."""
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        if inference_mode:
            self._set_base_requires_grad(False)

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
        return replace_mask(self.ast_mask[name], nm_mask(score, n, m, dim=self.input_dim), self.ast_initial_mask[name])

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
            dense = is_dense_phase(self, active[0])  # progressive schedule before its final prune
            weight = cast_weight(self, active[0]) if dense else self.effective_weight(active[0])
            out = linear_forward(x, weight, base.bias, self.fan_in_fan_out)
        else:
            return self.base_layer(x, *args, **kwargs)
        for name in active:
            if name in self.ast_slorb:
                out = out + self.ast_slorb[name](x).to(out.dtype)
        return out

    # ---- merging ----
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write ``W ⊙ mask`` into the base weight (zeros stored); SLoRB stays a separate branch.

        ``safe_merge`` checks the masked weight and the SLoRB branch for NaN/inf before anything is written.
        Merging again warns (PEFT's ``check_adapters_to_merge``) and changes nothing.
        """
        names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.ast_mask]
        for name in names:
            if is_dense_phase(self, name):
                raise ValueError(
                    f"{self._ast_module_name}: adapter {name!r} uses schedule='progressive' and has not had its final "
                    "N:M prune yet (ASTTrainer does it at the end of training; or call "
                    "hf_sparse.tuners.ast.progressive.finalize_progressive(model.base_model))"
                )
            weight = self.get_base_layer().weight
            mask = self.ast_mask[name]
            with torch.no_grad():
                merged = weight.data * mask
                if safe_merge:
                    self._check_finite_for_merge(name, merged)
                self._pruned_backup[name] = weight.data * (~mask)
                weight.data.copy_(merged)
            self.merged_adapters.append(name)

    def _check_finite_for_merge(self, name: str, merged: torch.Tensor) -> None:
        bad = [] if torch.isfinite(merged).all() else ["the masked weight"]
        if name in self.ast_slorb:
            bad += [f"SLoRB {p}" for p, t in self.ast_slorb[name].named_parameters() if not torch.isfinite(t).all()]
        if bad:
            raise ValueError(
                f"{self._ast_module_name}: NaNs detected in the merged weights. The adapter {name} seems to be broken "
                f"(non-finite values in {', '.join(bad)})"
            )

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
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
        requested = adapter_names or [a for a in self.active_adapters if a in self.ast_mask]
        pending = [a for a in requested if a not in self.merged_adapters]
        if pending:  # after merge_adapter() there is nothing left to merge: no "already merged" warning here
            self.merge(safe_merge=safe_merge, adapter_names=pending)
        elif safe_merge:
            for name in requested:  # the weight is merged already; the branch still has to be checked
                self._check_finite_for_merge(name, torch.zeros(()))
        names = adapter_names or self.merged_adapters
        slorbs = [self.ast_slorb[n] for n in names if n in self.ast_slorb]
        base = self.get_base_layer()
        if not slorbs:
            return base
        return SparseLinear.build(base.weight, base.bias, slorbs[0], self.fan_in_fan_out)

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
