"""Fused MoE expert tensors (transformers 5): which parameters they are and which dimension is each expert's input.

transformers 5 stores the routed experts of a layer as 3-D parameters ``[E, ., .]`` on one experts module
(``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``). Two layouts exist:

- ``[E, out, in]`` used as ``F.linear(x, W[e])`` (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GLM-4-MoE, ...): the
  input dimension is 2;
- ``[E, in, out]`` used as ``x @ W[e]`` (gpt-oss, Llama-4; ``is_transposed=True`` in
  ``@use_experts_implementation``): the input dimension is 1.

N:M groups always run along the input dimension, per expert. The layout is read from the module's
``is_transposed`` attribute (set by ``use_experts_implementation``) or, for undecorated classes, from
:data:`TRANSPOSED_EXPERT_CLASSES`; a module whose layout is unknown is refused with an error naming it.
"""

from __future__ import annotations

import re
from typing import Optional

from torch import nn

__all__ = [
    "EXPERT_PARAMETER_NAMES", "TRANSPOSED_EXPERT_CLASSES", "default_expert_parameters", "expert_input_dim",
    "expert_layout_known", "is_transposed_experts",
]

#: names the experts modules of transformers 5 give their fused 3-D weights (biases are 2-D and stay dense)
EXPERT_PARAMETER_NAMES = ("gate_up_proj", "up_proj", "gate_proj", "down_proj")
#: experts classes without ``use_experts_implementation`` whose weights are ``[E, in, out]`` (True) / ``[E, out, in]``
TRANSPOSED_EXPERT_CLASSES: dict[str, bool] = {"Llama4TextExperts": True}

_IN_DECODER_BLOCK = re.compile(r".*\.\d+\..*")


def is_transposed_experts(module: nn.Module) -> Optional[bool]:
    """True for ``[E, in, out]``, False for ``[E, out, in]``, None when the layout is unknown."""
    value = getattr(module, "is_transposed", None)
    if isinstance(value, bool):
        return value
    return TRANSPOSED_EXPERT_CLASSES.get(type(module).__name__)


def expert_layout_known(module: nn.Module) -> bool:
    return is_transposed_experts(module) is not None


def expert_input_dim(module: nn.Module, parameter_name: str, qualified_name: str = "<experts>") -> int:
    """The input dimension (1 or 2) of the 3-D expert parameter ``parameter_name`` of ``module``."""
    param = getattr(module, parameter_name, None)
    if param is None or param.dim() != 3:
        shape = None if param is None else tuple(param.shape)
        raise ValueError(
            f"{qualified_name}: argument `target_parameters` needs a 3-D [experts, ., .] parameter, got shape {shape}"
        )
    transposed = is_transposed_experts(module)
    if transposed is None:
        raise ValueError(
            f"{qualified_name}: the layout of {type(module).__name__}.{parameter_name} (which dimension is the input) is "
            "unknown: it is neither a `use_experts_implementation` class nor in "
            "hf_sparse.sparsity.experts.TRANSPOSED_EXPERT_CLASSES; add it there or drop it from `target_parameters`"
        )
    return 1 if transposed else 2


def default_expert_parameters(model: nn.Module) -> list[str]:
    """Qualified names of the fused expert weights inside decoder blocks whose layout is known (model order)."""
    found = []
    for name, module in model.named_modules():
        if not name or not _IN_DECODER_BLOCK.fullmatch(name) or "base_layer" in name.split("."):
            continue
        if not expert_layout_known(module):
            continue
        for pname, param in module.named_parameters(recurse=False):
            if pname in EXPERT_PARAMETER_NAMES and param.dim() == 3:
                found.append(f"{name}.{pname}")
    return found
