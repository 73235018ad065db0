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

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "none")
CALIBRATED_PRUNE_METHODS = ("wanda", "sparsegpt")
#: said (logger.warning, and by ``optimum-cli export hf-sparse`` on stderr) whenever a dense model is magnitude-pruned
MAGNITUDE_PRUNE_WARNING = (
    "one-shot magnitude {n}:{m} pruning of a dense model destroys its quality (SmolLM2-135M: held-out perplexity "
    "1,694 vs 31.1 dense; the export is not a usable model). Prune with SparseGPT instead (`optimum-cli export "
    "hf-sparse --prune sparsegpt --calibration-file TEXT`, or HfSparseQuantizer.quantize(prune='sparsegpt', "
    "calibration_data=ids)), and recover quality with AST training (`hf-sparse train RECIPE.yaml`, then export "
    "the run)"
)


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
        self.pruned_with: Optional[str] = None  # the method prune() applied to dense targets (for the model card)

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
        quantizer = cls(model, **kwargs)
        quantizer.source = str(model_or_path)
        return quantizer

    def target_names(self) -> list[str]:
        """AST's targets for these arguments (the one selector, :mod:`hf_sparse.targets`)."""
        from ..targets import TargetSelector

        return TargetSelector(self.target_modules, self.exclude_modules).select(self._inner_model()).modules

    def _inner_model(self) -> nn.Module:
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    @torch.no_grad()
    def prune(self, method: str = "magnitude", calibration_data: Any = None) -> dict[str, bool]:
        """Make every target exactly N:M in place; returns ``{name: was_already_sparse}``.

        ``magnitude`` needs no data but wrecks a dense model (a loud warning says so); ``sparsegpt``/``wanda``
        calibrate on ``calibration_data`` (token ids ``[num_samples, seq_len]``), layer by layer.
        """
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
            report[name] = is_nm_sparse(module.weight, self.n, self.m, dim=input_dim_of(module))
        dense = [name for name, already in report.items() if not already]
        if not dense:
            return report
        if method == "none":
            raise ValueError(
                f"{dense[0]}: weight is not {self.n}:{self.m} sparse and argument `prune`='none'; use "
                f"prune='sparsegpt' (or prune first with `hf-sparse prune` / AST training)"
            )
        if method in CALIBRATED_PRUNE_METHODS:
            if calibration_data is None:
                raise ValueError(f"HfSparseQuantizer: prune={method!r} needs `calibration_data` (token ids); "
                                 "optimum-cli: --calibration-file TEXT")
            from ..oneshot.api import prune_oneshot

            prune_oneshot(inner, method, calibration_data, n=self.n, m=self.m, target_modules=self.target_modules,
                          exclude_modules=self.exclude_modules)
        else:
            logger.warning("HfSparseQuantizer: " + MAGNITUDE_PRUNE_WARNING.format(n=self.n, m=self.m))
            for name in dense:
                module = inner.get_submodule(name)
                get_pruner(method)(module, name, self.n, self.m).prune()  # the one-shot magnitude pruner
        self.pruned_with = method
        logger.info("HfSparseQuantizer: %d/%d targets pruned to %d:%d (%s)", len(dense), len(report), self.n, self.m,
                    method)
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

        card = dict(export_kwargs.pop("card", None) or {})
        if self._is_peft():
            targets = None  # the AST layers are the targets; their masks are already exact N:M
            card.setdefault("sparsity_method", "AST")
        else:
            self.prune(prune, calibration_data)
            targets = self.target_names()
        source = getattr(self, "source", None)
        if source is not None and Path(source).is_dir():
            from ..exporters.provenance import read_provenance

            for key, value in read_provenance(source).items():  # e.g. a `hf-sparse prune` output
                card.setdefault(key, value)
        if self.pruned_with is not None:
            card["sparsity_method"] = f"{self.pruned_with} (one-shot)"
            card["token_budget"] = 0
            card.setdefault("base_model", str(Path(source).resolve()) if source and Path(source).exists() else source)
        export_kwargs["card"] = card
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
