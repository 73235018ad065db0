"""N:M semi-structured masks along the input dimension of a weight.

"N:M" keeps the N highest-scoring entries in every run of M consecutive *input* weights of each
output row (2:4 is the layout the GPU sparse kernels want). Everything here is vectorised: one
``topk`` over a reshaped view, so recomputing masks every few steps stays cheap on 7B models.
"""

from __future__ import annotations

import torch

__all__ = ["validate_nm", "nm_mask", "is_nm_sparse", "nm_violations", "input_dim_of"]


def validate_nm(n: int, m: int, *, in_features: int | None = None, module_name: str = "<config>") -> None:
    """Raise a ValueError naming the module and the argument when an N:M pattern cannot apply."""
    if not isinstance(n, int) or not isinstance(m, int) or n < 1 or m < 2:
        raise ValueError(f"{module_name}: N:M sparsity needs integers n >= 1 and m >= 2, got n={n!r}, m={m!r}.")
    if n >= m:
        raise ValueError(f"{module_name}: argument `n` must be smaller than `m` (got n={n}, m={m}); n >= m is dense.")
    if in_features is not None and in_features % m != 0:
        raise ValueError(
            f"{module_name}: in_features={in_features} is not divisible by argument `m`={m}; "
            f"N:M groups run along the input dimension. Exclude this module or choose another `m`."
        )


def input_dim_of(module: torch.nn.Module) -> int:
    """Which dimension of ``module.weight`` is the input dimension (GPT-2's Conv1D stores it transposed)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return 0
    if isinstance(module, torch.nn.Linear):
        return 1
    raise TypeError(f"unsupported module type {type(module).__name__}: only nn.Linear and transformers Conv1D")


def nm_mask(score: torch.Tensor, n: int = 2, m: int = 4, dim: int = -1) -> torch.Tensor:
    """Bool mask keeping the ``n`` largest entries of ``score`` in every group of ``m`` along ``dim``.

    ``score`` may have any number of dimensions; ties are broken by ``topk`` (deterministic on a device).
    """
    validate_nm(n, m, in_features=score.shape[dim])
    moved = score.movedim(dim, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    keep = groups.topk(n, dim=-1, sorted=False).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=score.device)
    mask.scatter_(-1, keep, True)
    return mask.reshape(moved.shape).movedim(-1, dim)


def nm_violations(tensor: torch.Tensor, n: int = 2, m: int = 4, dim: int = -1) -> int:
    """Number of M-groups along ``dim`` with more than ``n`` non-zeros (bool masks: more than ``n`` True)."""
    moved = (tensor != 0).movedim(dim, -1)
    if moved.shape[-1] % m:
        return moved.shape[-1]
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    return int((groups.sum(-1) > n).sum())


def is_nm_sparse(tensor: torch.Tensor, n: int = 2, m: int = 4, dim: int = -1) -> bool:
    """True when every group of ``m`` along ``dim`` holds at most ``n`` non-zeros."""
    return nm_violations(tensor, n, m, dim) == 0
