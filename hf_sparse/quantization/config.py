"""HfSparseConfig: the one configuration of an export, written to ``config.json`` and read back by the loader.

transformers' pattern (``utils/quantization_config.py``): a :class:`~transformers.utils.quantization_config.
QuantizationConfigMixin` subclass that ``hf_sparse.export`` takes, that lands in ``config.json["quantization_config"]``
(``quant_method: "hf_sparse"``), and that ``from_pretrained`` hands to the registered quantizer. The on-disk fields are
the :class:`~hf_sparse.format.NMSpec` ones; ``method`` (rtn/gptq) is recorded as provenance; ``verify_checksums`` is a
loading option and never saved.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Optional

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..format import FORMAT_VERSION, QUANT_METHOD, FormatError, NMSpec
from .registry import QUANTIZATION_METHODS

__all__ = ["HfSparseConfig", "EXPORT_OPTIONS"]

#: the keyword arguments of ``export`` / ``fake_quantize`` / ``export_compressed_tensors`` that build a config
EXPORT_OPTIONS = ("n", "m", "bits", "group_size", "symmetric", "method", "targets")


class HfSparseConfig(QuantizationConfigMixin):
    """N:M pattern, kept-value quantization and targets of an hf_sparse export.

    Args:
        n, m: keep ``n`` of every ``m`` consecutive input weights.
        bits: 16 stores kept values as fp16/bf16; 8 or 4 quantizes them (unsigned codes + scales [+ zeros]).
        group_size: input channels per scale (a multiple of ``m``: 32/64/128...), ``None`` (or -1, as in
            transformers' ``GPTQConfig``) for one scale per output channel. Ignored at 16 bits.
        symmetric: implicit zero ``2**(bits-1)`` (True) or stored zero-points.
        method: a registered quantization method (:mod:`hf_sparse.quantization.registry`): ``"rtn"``, ``"gptq"``.
        targets: which linears to export (:mod:`hf_sparse.targets` rules) before the export; the exact qualified
            names after it.
        values_dtype, scale_dtype: storage dtypes (``values_dtype`` ``None``: the model's fp16/bf16, else fp16).
        slorb: ``None`` or ``{"group_size": k, "train_projection": bool}`` (filled in by the exporter).
        format_version: the file format the checkpoint follows (:data:`hf_sparse.format.FORMAT_VERSION`).
        verify_checksums: loading option: hash every shard against its checksum (``HF_SPARSE_VERIFY_CHECKSUMS=0``
            turns it off: transformers passes no loading options of third-party configs through).
    """

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        bits: int = 16,
        group_size: Optional[int] = 128,
        symmetric: bool = True,
        method: str = "rtn",
        targets: Optional[Any] = None,
        values_dtype: Optional[str] = None,
        scale_dtype: str = "float16",
        slorb: Optional[dict[str, Any]] = None,
        format_version: int = FORMAT_VERSION,
        verify_checksums: bool = True,
        expert_targets: Optional[list[str]] = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        if group_size == -1:
            group_size = None
        self.n, self.m, self.bits, self.symmetric = n, m, bits, symmetric
        self.group_size = group_size if bits < 16 else None
        self.method = method
        self.targets = targets
        self.values_dtype, self.scale_dtype = values_dtype, scale_dtype
        self.slorb = slorb
        self.format_version = format_version
        self.expert_targets = list(expert_targets or [])  # exact fused MoE expert parameter names (filled by export)
        self.verify_checksums = verify_checksums and os.environ.get("HF_SPARSE_VERIFY_CHECKSUMS", "1") != "0"
        if method not in QUANTIZATION_METHODS:
            raise ValueError(f"HfSparseConfig: argument `method` must be one of {sorted(QUANTIZATION_METHODS)}, got {method!r}")
        self.spec_for(list(targets) if isinstance(targets, (list, tuple)) else [])  # validates, errors name the field

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Read ``config.json["quantization_config"]``: it must say which format version it follows."""
        if "format_version" not in config_dict:
            raise FormatError("quantization_config has no `format_version`: not an hf_sparse export")
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_options(cls, quantization_config: Optional["HfSparseConfig"] = None, **options: Any) -> "HfSparseConfig":
        """A config from a config and/or keyword options (``bits=4, group_size=128, ...``); an option overrides it."""
        unknown = set(options) - set(EXPORT_OPTIONS)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}; export options are {list(EXPORT_OPTIONS)}")
        if quantization_config is None:
            return cls(**options)
        if not isinstance(quantization_config, HfSparseConfig):
            raise TypeError(
                f"argument `quantization_config` must be an HfSparseConfig, got {type(quantization_config).__name__}"
            )
        if not options:
            return quantization_config
        merged = {k: getattr(quantization_config, k) for k in EXPORT_OPTIONS}
        merged.update(values_dtype=quantization_config.values_dtype, scale_dtype=quantization_config.scale_dtype)
        merged.update(options)
        return cls(**merged)

    @property
    def spec(self) -> NMSpec:
        """The on-disk spec of a loaded export (its ``targets`` are the exact names)."""
        return self.spec_for(list(self.targets or []), expert_targets=self.expert_targets)

    def spec_for(self, targets: list[str], values_dtype: Optional[str] = None,
                 slorb: Optional[dict[str, Any]] = None, expert_targets: Optional[list[str]] = None) -> NMSpec:
        """The :class:`NMSpec` to write for these exact targets (validated; errors name the field)."""
        return NMSpec(
            n=self.n, m=self.m, bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
            values_dtype=values_dtype or self.values_dtype or "float16", scale_dtype=self.scale_dtype,
            targets=list(targets), slorb=slorb if slorb is not None else self.slorb, format_version=self.format_version,
            expert_targets=list(expert_targets or []),
        )

    def written(self, spec: NMSpec) -> "HfSparseConfig":
        """The config as stored with an export packed by ``spec`` (exact targets, dtypes, SLoRB)."""
        out = copy.copy(self)
        out.targets, out.values_dtype, out.slorb = list(spec.targets), spec.values_dtype, spec.slorb
        out.expert_targets = list(spec.expert_targets)
        out.group_size = spec.group_size
        return out

    def to_dict(self) -> dict[str, Any]:
        out = self.spec.to_dict()
        out["method"] = self.method
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()
