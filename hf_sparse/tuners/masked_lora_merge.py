"""Merge a LoRA trained on top of an N:M sparse model without densifying it: ``W + M ⊙ BA``.

PEFT's own ``merge_and_unload`` adds the dense ``BA`` and destroys the 2:4 pattern. Here the
mask comes from the sparse base weight itself (its non-zeros) or from an explicit dict of masks.
"""

from __future__ import annotations

from typing import Optional

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..sparsity.nm import input_dim_of, nm_mask

__all__ = ["merge_lora_keep_mask"]


def _weight_mask(base: nn.Module, n: int, m: int) -> torch.Tensor:
    weight = base.weight.detach()
    # non-zeros win; among exact zeros the choice is irrelevant (they stay zero or take a masked delta of zero)
    return nm_mask(weight.abs().float() + (weight != 0).float(), n, m, dim=input_dim_of(base))


@torch.no_grad()
def merge_lora_keep_mask(
    peft_model: nn.Module,
    n: int = 2,
    m: int = 4,
    masks: Optional[dict[str, torch.Tensor]] = None,
    adapter_name: str = "default",
) -> nn.Module:
    """Merge every LoRA layer as ``W + M ⊙ ΔW`` and return the unloaded base model (N:M pattern kept).

    ``masks`` maps qualified module names (as in the base model) to bool masks in the weight's layout;
    missing ones are read off the sparse base weight.
    """
    masks = masks or {}
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        base = module.get_base_layer()
        key = name[len(prefix):] if name.startswith(prefix) else name
        mask = masks.get(key)
        if mask is None:
            if hasattr(base, "nm_mask"):
                mask = base.nm_mask()
            else:
                mask = _weight_mask(base, n, m)
        delta = module.get_delta_weight(adapter_name)
        if delta.shape != base.weight.shape:
            raise ValueError(f"{key}: LoRA delta shape {tuple(delta.shape)} != weight shape {tuple(base.weight.shape)}")
        if hasattr(base, "add_masked_delta_"):
            base.add_masked_delta_(delta, mask)
        else:
            base.weight.data.add_((delta * mask).to(base.weight.dtype))
    return peft_model.unload()
