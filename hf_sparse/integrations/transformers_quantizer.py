"""Load hf_sparse exports with ``AutoModelForCausalLM.from_pretrained`` through transformers' quantizer registry.

``import hf_sparse`` registers :class:`~hf_sparse.quantization.config.HfSparseConfig` (the one config that
``hf_sparse.export`` takes and writes) / :class:`HfSparseHfQuantizer` as ``"hf_sparse"`` (transformers' naming:
``GptqHfQuantizer``...; the Optimum quantizer is :class:`hf_sparse.optimum.HfSparseQuantizer`).
Before weights load (model on the meta device) the quantizer checks the checkpoint headers against the
format (names, shapes, dtypes, version, checksums) and swaps every target for a :class:`PackedNMLinear`
whose buffers have exactly the stored shapes, so the packed tensors load straight into them: no dense
copy of the model is ever built. It refuses checkpoints that hold packed tensors for modules the config
does not target, or that lack a tensor the model needs (transformers would silently initialise it at
random). After loading it checks that the positions encode a valid N:M pattern and that every loaded
floating tensor is finite (one tensor at a time).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..format import (
    CHECKSUM_KEY,
    POSITIONS,
    QUANT_METHOD,
    SLORB_KEYS,
    FormatError,
    NMSpec,
    canonical_slorb_suffix,
    expected_tensors,
    positions_valid,
    safetensors_dtype,
)
from ..load_guard import strip_load_guard
from ..format import expected_expert_tensors
from ..modules import PackedNMLinear
from ..modules.packed_experts import PackedExpertWeight, install_packed_expert
from ..sparsity.experts import is_transposed_experts
from ..quantization.config import HfSparseConfig
from ..quantization.transformers_hooks import HfSparseLoaderBase, register_transformers_quantizer

logger = logging.getLogger(__name__)

__all__ = ["HfSparseConfig", "HfSparseHfQuantizer", "register_with_transformers", "FormatError"]


def _read_headers(checkpoint_files: list[str], verify: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from safetensors import safe_open

    from ..checksum import verify_checksum

    header: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for file in checkpoint_files:
        if not str(file).endswith(".safetensors"):
            raise FormatError(f"hf_sparse loads safetensors only; got checkpoint file {file}")
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    header[key] = (tuple(sl.get_shape()), safetensors_dtype(sl.get_dtype(), key))
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
        if ok is None and verify:
            logger.warning(
                "hf_sparse: %s carries no checksum (%r missing from its safetensors metadata), so corruption in it "
                "cannot be detected; re-export it with hf_sparse.export to add one.", file, CHECKSUM_KEY,
            )
    return header


def _is_packed_key(key: str) -> bool:
    """A tensor only a PackedNMLinear holds: ``<module>.nm_*`` or its SLoRB branch ``<module>.slorb.*``."""
    return key.rpartition(".")[2].startswith("nm_") or canonical_slorb_suffix(key) is not None


def _packed_module(key: str) -> str:
    for suffix in SLORB_KEYS:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1]
    return key.rpartition(".")[0]


def check_stray_packed_tensors(targets: list[str], header_keys) -> None:
    """Refuse packed tensors of modules that ``quantization_config.targets`` does not list.

    Otherwise transformers drops them as "unexpected" and the module loads as a randomly initialised Linear.
    """
    target_set = set(targets)
    stray = sorted(k for k in header_keys if _is_packed_key(k) and _packed_module(k) not in target_set)
    if stray:
        modules = sorted({_packed_module(k) for k in stray})
        raise FormatError(
            f"hf_sparse: the checkpoint holds packed N:M tensors for {len(modules)} module(s) that "
            f"quantization_config.targets does not list: {_short_list(stray)}. They would be ignored and "
            f"{_short_list(modules)} loaded with random weights: corrupted checkpoint or edited config.json "
            f"(add the modules to `targets` or re-export the model)."
        )


def _short_list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _loaded_keys(model: nn.Module, header_keys, hf_quantizer: Any) -> set[str]:
    """The model keys the checkpoint's keys load into (transformers' renamings, converters and prefix rules)."""
    meta_state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(model, None, hf_quantizer)
        renamings = [e for e in mapping if isinstance(e, WeightRenaming)]
        converters = [e for e in mapping if isinstance(e, WeightConverter)]
    except Exception:  # older/newer transformers: fall back to names as stored (+ the base-model prefix rule)
        rename_source_key, renamings, converters = None, [], []
    loaded = set()
    for key in header_keys:
        renamed = key
        if rename_source_key is not None:
            try:
                renamed, _ = rename_source_key(key, renamings, converters, prefix, meta_state)
                if renamed not in meta_state and key in meta_state:
                    renamed = key
            except Exception:
                renamed = key
        elif prefix and renamed not in meta_state:
            if renamed.startswith(prefix + ".") and renamed[len(prefix) + 1 :] in meta_state:
                renamed = renamed[len(prefix) + 1 :]
            elif f"{prefix}.{renamed}" in meta_state:
                renamed = f"{prefix}.{renamed}"
        loaded.add(renamed)
    return loaded


def _tied_groups(model: nn.Module) -> list[set[str]]:
    """Sets of keys tied together (transformers ties symmetrically: any one present in the checkpoint is enough)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:
        tied = getattr(model, "_tied_weights_keys", None)
    if not isinstance(tied, dict):
        tied = {}
    groups: dict[str, set[str]] = {}
    for target, source in tied.items():
        group = groups.get(source, {source}) | groups.get(target, {target})
        for key in group:
            groups[key] = group
    unique: list[set[str]] = []
    for group in groups.values():
        if not any(group is g for g in unique):
            unique.append(group)
    return unique


def check_missing_tensors(model: nn.Module, header_keys, hf_quantizer: Any = None) -> None:
    """Refuse a checkpoint that lacks a tensor the model needs (after targets were swapped for PackedNMLinear).

    Tied weights count as present when any key of their tie group is stored; non-persistent buffers (rotary
    ``inv_freq`` ...) are not in ``state_dict`` and are not expected; neither are the model's
    ``_keys_to_ignore_on_load_missing`` patterns.
    """
    expected = set(model.state_dict().keys())
    non_persistent = getattr(model, "named_non_persistent_buffers", None)
    if callable(non_persistent):
        expected -= {k for k, _ in non_persistent()}
    loaded = _loaded_keys(model, header_keys, hf_quantizer)
    missing = expected - loaded
    for group in _tied_groups(model):
        if group & missing and group & loaded:
            missing -= group
    patterns = getattr(model, "_keys_to_ignore_on_load_missing", None) or ()
    if patterns and missing:
        regex = re.compile("|".join(f"({p})" for p in patterns))
        missing = {k for k in missing if regex.search(k) is None}
    if missing:
        names = sorted(missing)
        raise FormatError(
            f"hf_sparse: the checkpoint lacks {len(names)} tensor(s) the model needs: {_short_list(names)}. "
            f"They would load randomly initialised: corrupted or incomplete checkpoint (a shard missing or "
            f"edited?); re-download or re-export it."
        )


_FINITE_CHUNK = 1 << 24  # elements per isfinite() call: bounds the bool temporary for huge embeddings


def _all_finite(t: torch.Tensor) -> bool:
    if t.dim() == 0 or t.numel() <= _FINITE_CHUNK:
        return bool(torch.isfinite(t).all())
    rows = max(1, _FINITE_CHUNK // max(1, t[0].numel()))
    return all(bool(torch.isfinite(chunk).all()) for chunk in t.split(rows, dim=0))


def check_finite(model: nn.Module) -> None:
    """Raise naming the first loaded floating tensor (parameter or persistent buffer) holding NaN/inf."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        tensors = list(module._parameters.items()) + [
            (k, v) for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set
        ]
        for tname, t in tensors:
            if t is None or id(t) in seen or not t.is_floating_point() or t.device.type == "meta":
                continue
            seen.add(id(t))
            if not _all_finite(t.detach()):
                key = f"{mod_name}.{tname}" if mod_name else tname
                raise FormatError(f"{key} holds NaN/inf values: corrupted checkpoint; re-download or re-export it.")


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
        float_ok = (suffix == "bias" or canonical_slorb_suffix(suffix) is not None) and got_dtype.is_floating_point
        if got_dtype != dtype and not float_ok:
            raise FormatError(f"{key}: dtype {got_dtype} does not match the format's {dtype}")


def _install_packed_expert(model: nn.Module, modules: dict, name: str, spec: NMSpec, header: Optional[dict]) -> None:
    """Swap the fused expert parameter ``name`` for a :class:`PackedExpertWeight` on meta (shapes checked first)."""
    module_name, _, pname = name.rpartition(".")
    experts = modules.get(module_name)
    param = None if experts is None else experts._parameters.get(pname)
    if param is None or param.dim() != 3:
        raise FormatError(f"quantization_config.expert_targets names {name!r}, which is not a fused 3-D expert "
                          f"parameter of {type(model).__name__}")
    transposed = is_transposed_experts(experts)
    if transposed is None:
        raise FormatError(f"{name}: the layout of {type(experts).__name__} is unknown to hf_sparse (is_transposed)")
    num_experts, a, b = param.shape
    out_f, in_f = (b, a) if transposed else (a, b)
    spec.check_shape(in_f, name)
    if header is not None:
        for suffix, (shape, dtype) in expected_expert_tensors(spec, num_experts, out_f, in_f).items():
            key = f"{name}.{suffix}"
            if key not in header:
                raise FormatError(f"{key} is missing from the checkpoint (expected {list(shape)} {dtype})")
            if header[key] != (shape, dtype):
                got_shape, got_dtype = header[key]
                raise FormatError(f"{key}: {list(got_shape)} {got_dtype} does not match the format's {list(shape)} "
                                  f"{dtype} for {num_experts} experts of {out_f}x{in_f} {spec.n}:{spec.m} "
                                  f"bits={spec.bits}")
    dtype = param.dtype if param.is_floating_point() else torch.get_default_dtype()
    packed = PackedExpertWeight(num_experts, out_f, in_f, spec, transposed, dtype=dtype, device="meta", name=name)
    install_packed_expert(experts, pname, packed)


class HfSparseHfQuantizer(HfSparseLoaderBase):
    """Swap targets for PackedNMLinear on the meta device; load packed tensors as they are; validate."""

    quantization_config: HfSparseConfig  # only pre-exported checkpoints load (export is hf_sparse.export)

    def update_attn_implementation(self, config):
        """transformers' one look at the config before the checkpoint files resolve: drop the entry that makes
        plain transformers refuse the export (:mod:`hf_sparse.load_guard`)."""
        return super().update_attn_implementation(strip_load_guard(config))

    def _process_model_before_weight_loading(self, model, checkpoint_files: Optional[list[str]] = None, **kwargs):
        spec = self.quantization_config.spec
        header = _read_headers(checkpoint_files, self.quantization_config.verify_checksums) if checkpoint_files else None
        modules = dict(model.named_modules())
        if not spec.targets and not spec.expert_targets:
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
            packed.was_conv1d = isinstance(module, Conv1D)  # dequantize() gives the model's own layer type back
            model.set_submodule(name, packed)
        for name in spec.expert_targets:  # fused MoE expert parameters (format version 2)
            _install_packed_expert(model, modules, name, spec, header)
        if header is not None:
            check_stray_packed_tensors(spec.targets + spec.expert_targets, header.keys())
            check_missing_tensors(model, header.keys(), self)
        return model

    def uses_legacy_slorb_names(self) -> bool:
        """Version-1 files name SLoRB's tensors ``slorb.S``/``slorb.X`` (a re-save writes them back so: the config
        keeps format_version=1)."""
        return self.quantization_config.spec.format_version == 1

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
        for name in spec.expert_targets:
            packed = model.get_submodule(name)
            for bname, t in packed.named_buffers():
                if t.device.type == "meta":
                    raise FormatError(f"{name}.{bname} was not loaded from the checkpoint")
            positions = getattr(packed, POSITIONS)
            if not positions_valid(positions.reshape(-1, positions.shape[-1]), spec, spec.kept(packed.in_features)):
                raise FormatError(f"{name}.{POSITIONS} does not encode a valid {spec.n}:{spec.m} pattern: corrupted "
                                  "checkpoint")
        check_finite(model)  # nm_values (bits=16), nm_scales/nm_zeros, bias, SLoRB and every dense tensor
        return model

    def dequantize(self, model, dtype=None):
        """transformers' ``dequantize`` (which drops ``quantization_config``), then the SLoRB modules it left are
        recorded as a merged model's are, so ``save_pretrained``/``from_pretrained`` keep the branch."""
        model = super().dequantize(model, dtype=dtype)
        if any(getattr(m, "slorb", None) is not None for m in model.modules()):
            from ..tuners.ast.merged import record_merged_slorb  # only here: loading never imports the tuner

            record_merged_slorb(model)
        return model

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: dense N:M ``nn.Linear`` layers (zeros stored), SLoRB kept as SparseLinear."""
        from ..modules import SparseLinear

        for name, module in list(model.named_modules()):
            if not isinstance(module, PackedNMLinear):
                continue
            wdtype = dtype or (module.bias.dtype if module.bias is not None else torch.float32)
            weight = module.dequantized_weight(wdtype)
            conv = getattr(module, "was_conv1d", False)  # GPT-2: a Conv1D again, weight [in, out]
            if conv:
                dense = Conv1D(module.out_features, module.in_features).to(device=weight.device, dtype=wdtype)
                weight = weight.t()
                if module.bias is None:
                    dense.bias = None
            else:
                dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                  device=weight.device, dtype=wdtype)
            with torch.no_grad():
                dense.weight.copy_(weight)
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            new: nn.Module = dense
            if module.slorb is not None:
                new = SparseLinear.build(dense.weight, dense.bias, module.slorb, fan_in_fan_out=conv)
            model.set_submodule(name, new)
        return model

    # is_trainable (base class): the packed base is frozen; adapters (LoRA via PEFT) train on top and merge back
    # with the mask


def register_with_transformers() -> None:
    """Register ``quant_method="hf_sparse"`` with transformers (idempotent)."""
    register_transformers_quantizer(QUANT_METHOD, HfSparseConfig, HfSparseHfQuantizer)

