"""``HfSparseQuantizer``: Optimum's quantizer interface over hf_sparse's pruning and exporter.

Why: Optimum users expect ``Quantizer.from_pretrained(model).quantize(save_dir)``. Here that means: make
the target linears exactly N:M (skipped when they already are, e.g. after AST training or one-shot
pruning), then write the packed (optionally int4/int8) checkpoint with :func:`hf_sparse.export.export`.
No pruning or packing logic lives here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

import torch
from optimum.quantization_base import OptimumQuantizer
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["HfSparseQuantizer", "PRUNE_METHODS"]

PRUNE_METHODS = ("magnitude", "none")


class HfSparseQuantizer(OptimumQuantizer):
    """Prune a causal LM to N:M (if needed) and export it in the hf_sparse format.

    Args:
        model: a transformers model, or an AST ``PeftModel`` (its masks define the sparsity: nothing is
            pruned, the exporter merges).
        n, m: the N:M pattern along the input dimension (2:4 is what GPUs accelerate).
        target_modules / exclude_modules: same syntax as :class:`hf_sparse.ASTConfig` (default: every
            Linear/Conv1D inside a decoder block except MoE routers).
        tokenizer: saved next to the export when given.
    """

    def __init__(
        self,
        model: nn.Module,
        n: int = 2,
        m: int = 4,
        target_modules: Optional[Union[str, list[str]]] = None,
        exclude_modules: Optional[Union[str, list[str]]] = None,
        tokenizer: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"HfSparseQuantizer: argument `model` must be a torch nn.Module, got {type(model).__name__}")
        from ..sparsity.nm import validate_nm

        validate_nm(n, m, module_name="HfSparseQuantizer")
        self.model, self.n, self.m = model, n, m
        self.target_modules, self.exclude_modules, self.tokenizer = target_modules, exclude_modules, tokenizer

    @classmethod
    def from_pretrained(cls, model_or_path: Union[str, Path, nn.Module], file_name: Optional[str] = None, **kwargs: Any):
        """Wrap a loaded model, or load one with ``AutoModelForCausalLM.from_pretrained`` (+ its tokenizer)."""
        if file_name is not None:
            raise ValueError(
                "HfSparseQuantizer.from_pretrained: argument `file_name` is not supported; pass the model directory "
                "or hub id (transformers finds the weight files)"
            )
        if isinstance(model_or_path, nn.Module):
            return cls(model_or_path, **kwargs)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        load_kwargs = {k: kwargs.pop(k) for k in ("dtype", "device_map", "revision", "trust_remote_code") if k in kwargs}
        model = AutoModelForCausalLM.from_pretrained(model_or_path, **load_kwargs)
        if "tokenizer" not in kwargs:
            try:
                kwargs["tokenizer"] = AutoTokenizer.from_pretrained(model_or_path)
            except (OSError, ValueError) as err:  # a weights-only directory: export without a tokenizer
                logger.info("no tokenizer at %s (%s); exporting without one", model_or_path, err)
        return cls(model, **kwargs)

    def target_names(self) -> list[str]:
        """AST's targets for these arguments (the one selector, :mod:`hf_sparse.targets`)."""
        from ..targets import TargetSelector

        return TargetSelector(self.target_modules, self.exclude_modules).select(self._inner_model()).modules

    def _inner_model(self) -> nn.Module:
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    @torch.no_grad()
    def prune(self, method: str = "magnitude") -> dict[str, bool]:
        """Make every target exactly N:M in place; returns ``{name: was_already_sparse}``."""
        from ..oneshot.registry import get_pruner
        from ..sparsity import is_nm_sparse
        from ..sparsity.nm import input_dim_of

        if self._is_peft():
            raise ValueError("HfSparseQuantizer.prune: an AST PeftModel is already N:M through its masks; call quantize()")
        if method not in PRUNE_METHODS:
            raise ValueError(f"HfSparseQuantizer: argument `prune`={method!r} must be one of {PRUNE_METHODS}")
        inner = self._inner_model()
        report = {}
        for name in self.target_names():
            module = inner.get_submodule(name)
            dim = input_dim_of(module)
            already = is_nm_sparse(module.weight, self.n, self.m, dim=dim)
            report[name] = already
            if already:
                continue
            if method == "none":
                raise ValueError(
                    f"{name}: weight is not {self.n}:{self.m} sparse and argument `prune`='none'; use "
                    f"prune='magnitude' (or prune first with `hf-sparse prune` / AST training)"
                )
            get_pruner(method)(module, name, self.n, self.m).prune()  # the one-shot magnitude pruner
        done = sum(not v for v in report.values())
        logger.info("HfSparseQuantizer: %d/%d targets pruned to %d:%d (%s)", done, len(report), self.n, self.m, method)
        return report

    def quantize(
        self,
        save_dir: Union[str, Path],
        file_prefix: Optional[str] = None,
        *,
        bits: int = 16,
        group_size: Optional[int] = 128,
        symmetric: bool = True,
        method: str = "rtn",
        prune: str = "magnitude",
        calibration_data: Any = None,
        dtype: Optional[torch.dtype] = None,
        **export_kwargs: Any,
    ) -> Path:
        """Prune to N:M (if needed) and export to ``save_dir`` (atomic); returns the directory.

        ``bits``/``group_size``/``symmetric``/``method``/``calibration_data``/``dtype`` go to
        :func:`hf_sparse.export.export` (``method="gptq"`` needs ``calibration_data``).
        """
        if file_prefix is not None:
            raise ValueError(
                "HfSparseQuantizer.quantize: argument `file_prefix` is not supported; exports use transformers' "
                "standard file names so that from_pretrained loads them"
            )
        from ..exporters import export

        if self._is_peft():
            targets = None  # the AST layers are the targets; their masks are already exact N:M
        else:
            self.prune(prune)
            targets = self.target_names()
        return Path(
            export(
                self.model, save_dir, bits=bits, group_size=group_size, symmetric=symmetric, method=method,
                calibration_data=calibration_data, n=self.n, m=self.m, targets=targets, dtype=dtype,
                tokenizer=self.tokenizer, **export_kwargs,
            )
        )

    def _is_peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)
