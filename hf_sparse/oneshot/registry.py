"""Registry of one-shot N:M pruners: name -> class, filled by the ``@register_pruner`` decorator.

A pruner handles ONE weight matrix (``nn.Linear`` or GPT-2 ``Conv1D``): it is fed the inputs that module sees
(``add_batch``), then ``prune()`` chooses the N:M mask, writes the pruned (for SparseGPT: also updated) weight
into the module and returns the bool keep-mask in the weight's own layout. The driver
(:mod:`hf_sparse.oneshot.sequential`) decides which inputs each pruner sees.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import nn

from ..registry import Registry
from ..sparsity.nm import input_dim_of, validate_nm

__all__ = ["OneShotPruner", "PRUNERS", "register_pruner", "get_pruner"]

_P = TypeVar("_P")

PRUNERS = Registry("one-shot pruning method", argument="method", name_attribute="method")


def register_pruner(name: str) -> Callable[[_P], _P]:
    """Class decorator: make a pruner available to :func:`hf_sparse.oneshot.prune_oneshot` as ``method=name``."""
    return PRUNERS.register(name)


def get_pruner(name: str) -> type["OneShotPruner"]:
    """The pruner class registered as ``name``; the error lists the known methods."""
    return PRUNERS.get_entry(name)


class OneShotPruner:
    """Base class: one target module, its N:M pattern, and the statistics of its inputs.

    Args:
        module: the ``nn.Linear``/``Conv1D`` to prune (its ``weight`` is modified in place by :meth:`prune`).
        name: qualified module name (for error messages).
        n, m: keep ``n`` of every ``m`` consecutive input weights of each output row.
    """

    method: str = "<unregistered>"
    needs_calibration: bool = True

    def __init__(self, module: nn.Module, name: str, n: int = 2, m: int = 4) -> None:
        self.module = module
        self.name = name
        self.n, self.m = n, m
        self.input_dim = input_dim_of(module)
        self.in_features = module.weight.shape[self.input_dim]
        validate_nm(n, m, in_features=self.in_features, module_name=name)
        self.num_tokens = 0

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """Module input as fp32 [tokens, in_features] (the last dim is the input dim for Linear and Conv1D)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: input has {x.shape[-1]} features, the weight expects {self.in_features}")
        return x.detach().reshape(-1, self.in_features).float()

    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate statistics of one batch of this module's inputs (no-op for data-free methods)."""

    def weight_out_in(self) -> torch.Tensor:
        """The weight as fp32 [out, in] (a copy for Conv1D, whose weight is stored [in, out])."""
        w = self.module.weight.detach()
        return (w.t() if self.input_dim == 0 else w).float()

    def write_out_in(self, w_out_in: torch.Tensor) -> None:
        """Write an [out, in] weight back in the module's own layout and dtype."""
        w = w_out_in.t() if self.input_dim == 0 else w_out_in
        self.module.weight.data.copy_(w.to(self.module.weight.dtype))

    def prune(self) -> torch.Tensor:
        """Choose the mask, write the pruned weight into the module, return the keep-mask (weight layout)."""
        raise NotImplementedError

    def free(self) -> None:
        """Drop accumulated statistics (called after :meth:`prune`)."""
