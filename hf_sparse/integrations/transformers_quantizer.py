"""Load hf_sparse exports with ``AutoModelForCausalLM.from_pretrained`` through transformers' quantizer registry.

``import hf_sparse`` registers :class:`HfSparseConfig` / :class:`HfSparseQuantizer` as ``"hf_sparse"``.
Before weights load (model on the meta device) the quantizer checks the checkpoint headers against the
format (names, shapes, dtypes, version, checksums) and swaps every target for a :class:`PackedNMLinear`
whose buffers have exactly the stored shapes, so the packed tensors load straight into them: no dense
copy of the model is ever built. After loading it checks that the positions encode a valid N:M pattern.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..export.format import (
    POSITIONS,
    QUANT_METHOD,
    VALUES,
    FormatError,
    NMSpec,
    expected_tensors,
    positions_valid,
)
from ..kernels.packed_linear import PackedNMLinear

logger = logging.getLogger(__name__)

__all__ = ["HfSparseConfig", "HfSparseQuantizer", "register_with_transformers", "FormatError"]


class HfSparseConfig(QuantizationConfigMixin):
    """``config.json["quantization_config"]`` of an hf_sparse export (see docs/format.md).

    ``verify_checksums`` is a loading option (not saved): hash every shard's tensors against the checksum
    the exporter wrote, to tell corruption from a format mismatch. It costs one extra read of the files;
    set the environment variable ``HF_SPARSE_VERIFY_CHECKSUMS=0`` to skip it (transformers does not pass
    loading options of third-party configs through ``from_pretrained``).
    """

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        bits: int = 16,
        group_size: Optional[int] = None,
        symmetric: bool = True,
        values_dtype: str = "float16",
        scale_dtype: str = "float16",
        targets: Optional[list[str]] = None,
        slorb: Optional[dict[str, Any]] = None,
        format_version: Optional[int] = None,
        verify_checksums: bool = True,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        if format_version is None:
            raise FormatError("quantization_config has no `format_version`: not an hf_sparse export")
        self.n, self.m, self.bits, self.group_size, self.symmetric = n, m, bits, group_size, symmetric
        self.values_dtype, self.scale_dtype = values_dtype, scale_dtype
        self.targets = list(targets or [])
        self.slorb = slorb
        self.format_version = format_version
        self.verify_checksums = verify_checksums and os.environ.get("HF_SPARSE_VERIFY_CHECKSUMS", "1") != "0"
        self.spec  # validates (version, pattern, bits, group size) with errors naming the field

    @property
    def spec(self) -> NMSpec:
        return NMSpec(
            n=self.n, m=self.m, bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
            values_dtype=self.values_dtype, scale_dtype=self.scale_dtype, targets=list(self.targets),
            slorb=self.slorb, format_version=self.format_version,
        )

    def to_dict(self) -> dict[str, Any]:
        out = self.spec.to_dict()
        out["quant_method"] = QUANT_METHOD
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def _read_headers(checkpoint_files: list[str], verify: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from safetensors import safe_open

    from ..export.writer import verify_checksum

    header: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for file in checkpoint_files:
        if not str(file).endswith(".safetensors"):
            raise FormatError(f"hf_sparse loads safetensors only; got checkpoint file {file}")
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    header[key] = (tuple(sl.get_shape()), _st_dtype(sl.get_dtype()))
            ok = verify_checksum(file) if verify else None
        except FormatError:
            raise
        except Exception as err:  # safetensors raises its own error types for truncation / bad headers
            raise FormatError(
                f"hf_sparse: cannot read {file}: {err}. The file is truncated or corrupted; re-download or re-export it."
            ) from err
        if ok is False:
            raise FormatError(
                f"hf_sparse: checksum mismatch in {file}: the tensor data is corrupted; re-download or re-export it."
            )
    return header


_ST_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}


def _st_dtype(name: str) -> torch.dtype:
    return _ST_DTYPES.get(name, torch.uint8 if name.startswith("U") else torch.float32)


def _linear_dims(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def check_module_tensors(
    name: str, spec: NMSpec, in_features: int, out_features: int, has_bias: bool,
    header: dict[str, tuple[tuple[int, ...], torch.dtype]],
) -> None:
    """Raise a FormatError naming the tensor when the checkpoint does not hold what ``spec`` says."""
    for suffix, (shape, dtype) in expected_tensors(spec, out_features, in_features, has_bias).items():
        key = f"{name}.{suffix}"
        if key not in header:
            if f"{name}.weight" in header:
                raise FormatError(f"{key} is missing but a dense {name}.weight is present: not an hf_sparse export of {name}")
            raise FormatError(f"{key} is missing from the checkpoint (expected {list(shape)} {dtype})")
        got_shape, got_dtype = header[key]
        if got_shape != shape:
            raise FormatError(f"{key}: shape {list(got_shape)} does not match the format's {list(shape)} for a "
                              f"{out_features}x{in_features} {spec.n}:{spec.m} bits={spec.bits} layer")
        float_ok = suffix in ("bias", "slorb.S", "slorb.X") and got_dtype.is_floating_point
        if got_dtype != dtype and not float_ok:
            raise FormatError(f"{key}: dtype {got_dtype} does not match the format's {dtype}")


class HfSparseQuantizer(HfQuantizer):
    """Swap targets for PackedNMLinear on the meta device; load packed tensors as they are; validate."""

    requires_calibration = True  # only pre-exported checkpoints load (export is hf_sparse.export)
    quantization_config: HfSparseConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def _process_model_before_weight_loading(self, model, checkpoint_files: Optional[list[str]] = None, **kwargs):
        spec = self.quantization_config.spec
        header = _read_headers(checkpoint_files, self.quantization_config.verify_checksums) if checkpoint_files else None
        modules = dict(model.named_modules())
        if not spec.targets:
            raise FormatError("quantization_config.targets is empty: nothing to load as N:M")
        for name in spec.targets:
            module = modules.get(name)
            if module is None:
                raise FormatError(f"quantization_config.targets names {name!r}, which {type(model).__name__} does not have")
            if not isinstance(module, (nn.Linear, Conv1D)):
                raise FormatError(f"{name}: target is a {type(module).__name__}, not a Linear/Conv1D")
            in_f, out_f = _linear_dims(module)
            has_bias = module.bias is not None
            spec.check_shape(in_f, name)
            if header is not None:
                check_module_tensors(name, spec, in_f, out_f, has_bias, header)
            dtype = module.weight.dtype if module.weight.is_floating_point() else torch.get_default_dtype()
            packed = PackedNMLinear(in_f, out_f, spec, bias=has_bias, device="meta", dtype=dtype, module_name=name)
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, packed)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        spec = self.quantization_config.spec
        for name in spec.targets:
            module = model.get_submodule(name)
            for pname, t in list(module.named_buffers()) + list(module.named_parameters()):
                if t.device.type == "meta":
                    raise FormatError(f"{name}.{pname} was not loaded from the checkpoint")
            kept = spec.kept(module.in_features)
            if not positions_valid(getattr(module, POSITIONS), spec, kept):
                raise FormatError(
                    f"{name}.{POSITIONS} does not encode a valid {spec.n}:{spec.m} pattern (positions must be strictly "
                    f"increasing and < {spec.m} in every group): corrupted checkpoint"
                )
            if spec.bits == 16 and not torch.isfinite(getattr(module, VALUES)).all():
                raise FormatError(f"{name}.{VALUES} holds NaN/inf values: corrupted checkpoint")
        return model

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: dense N:M ``nn.Linear`` layers (zeros stored), SLoRB kept as SparseLinear."""
        from ..tuners.ast.layer import SparseLinear

        for name, module in list(model.named_modules()):
            if not isinstance(module, PackedNMLinear):
                continue
            wdtype = dtype or (module.bias.dtype if module.bias is not None else torch.float32)
            weight = module.dequantized_weight(wdtype)
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device=weight.device, dtype=wdtype)
            with torch.no_grad():
                dense.weight.copy_(weight)
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            new: nn.Module = dense
            if module.slorb is not None:
                new = SparseLinear(dense.weight, dense.bias, module.slorb, fan_in_fan_out=False)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        return model

    def is_serializable(self, safe_serialization: bool = True) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # the packed base is frozen; adapters (LoRA via PEFT) train on top and merge back with the mask
        return True


def register_with_transformers() -> None:
    """Register ``quant_method="hf_sparse"`` with transformers (idempotent)."""
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(HfSparseConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(HfSparseQuantizer)

