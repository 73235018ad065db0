"""Merged AST models with SLoRB survive transformers' ``save_pretrained`` / ``from_pretrained``.

``merge_and_unload()`` of an AST model with SLoRB leaves :class:`~hf_sparse.modules.SparseLinear` modules (the N:M
weight with stored zeros plus the ``slorb`` branch), which no transformers model class defines: a plain reload would
drop the ``*.slorb.weight/projection`` tensors as "unexpected" and silently lose the branch. So the merge records
the branches in the model's config, as transformers' one hook for "modules the class does not build"::

    "quantization_config": {"quant_method": "hf_sparse_slorb",
                            "modules": {"model.layers.0.self_attn.q_proj": {"group_size": 16, ...}, ...}}

With ``import hf_sparse`` done, ``AutoModelForCausalLM.from_pretrained`` hands that entry to
:class:`MergedSLoRBHfQuantizer`, which swaps the listed modules for SparseLinear on the meta device before the
weights load (so ``weight``/``bias``/``slorb.weight``/``slorb.projection`` load straight into them; hf_sparse 0.1's
``slorb.S``/``slorb.X`` are renamed), refuses a checkpoint that lacks a branch tensor, and then removes itself: the
loaded model is a plain, non-quantized model (``.half()``, ``Trainer``,
``get_peft_model`` work as for any dense model) that keeps the entry, so saving it again round-trips too. Without
``import hf_sparse`` transformers warns "Unknown quantization type, got hf_sparse_slorb" instead of failing silently.
Nothing is quantized: the quantizer registry is only the mechanism.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.utils.quantization_config import QuantizationConfigMixin

from ...format import LEGACY_SLORB_KEYS, SLORB_PROJECTION, SLORB_WEIGHT
from ...modules.slorb import SLoRB
from ...quantization.transformers_hooks import HfSparseLoaderBase, register_transformers_quantizer
from ...modules.sparse_linear import SparseLinear

LEGACY_WEIGHT = next(iter(LEGACY_SLORB_KEYS))  # "slorb.S"

__all__ = [
    "MERGED_SLORB_METHOD",
    "MergedSLoRBConfig",
    "MergedSLoRBHfQuantizer",
    "record_merged_slorb",
    "register_merged_slorb",
]

MERGED_SLORB_METHOD = "hf_sparse_slorb"
_ENTRY_KEYS = ("group_size", "train_projection", "fan_in_fan_out")


class MergedSLoRBConfig(QuantizationConfigMixin):
    """``config.json["quantization_config"]`` of a merged AST model with SLoRB: which modules are SparseLinear.

    Args:
        modules: ``{qualified module name: {"group_size": k, "train_projection": bool, "fan_in_fan_out": bool}}``.
    """

    def __init__(self, modules: Optional[dict[str, dict[str, Any]]] = None, **kwargs: Any) -> None:
        self.quant_method = MERGED_SLORB_METHOD
        if not modules:
            raise ValueError(f"quantization_config ({MERGED_SLORB_METHOD}): argument `modules` is empty")
        checked = {}
        for name, entry in modules.items():
            missing = [k for k in _ENTRY_KEYS if k not in entry]
            if missing:
                raise ValueError(f"quantization_config ({MERGED_SLORB_METHOD}): modules[{name!r}] lacks {missing}")
            k = entry["group_size"]
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"quantization_config ({MERGED_SLORB_METHOD}): modules[{name!r}].group_size={k!r}")
            checked[name] = {"group_size": k, "train_projection": bool(entry["train_projection"]),
                             "fan_in_fan_out": bool(entry["fan_in_fan_out"])}
        self.modules = checked

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, "modules": copy.deepcopy(self.modules)}

    @classmethod
    def from_model(cls, model: nn.Module) -> Optional["MergedSLoRBConfig"]:
        """The entry describing ``model``'s SparseLinear modules; ``None`` when it has none."""
        modules = {
            name: {"group_size": m.slorb.k, "train_projection": m.slorb.projection is not None,
                   "fan_in_fan_out": m.fan_in_fan_out}
            for name, m in model.named_modules()
            if isinstance(m, SparseLinear)
        }
        return cls(modules) if modules else None


def record_merged_slorb(model: nn.Module) -> None:
    """Write (or refresh) the entry into ``model.config`` after a merge left SparseLinear modules in it.

    A config that already holds another method's ``quantization_config`` is left alone, with a warning: saving that
    model would lose the branches (``hf_sparse.export`` handles them).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return  # not a transformers model: nothing writes a config.json for it
    entry = MergedSLoRBConfig.from_model(model)
    current = getattr(config, "quantization_config", None)
    if isinstance(current, dict):
        current_method = current.get("quant_method")
    else:
        current_method = getattr(current, "quant_method", None)
    if entry is None:
        if current_method == MERGED_SLORB_METHOD:  # no branch left: a stale entry would make the reload fail
            del config.quantization_config
        return
    if current is not None and current_method != MERGED_SLORB_METHOD:
        warnings.warn(
            f"merge_and_unload: the model's config already has quantization_config (quant_method={current_method!r}), "
            f"so the SLoRB branches left as SparseLinear ({', '.join(list(entry.modules)[:3])}, ...) are not recorded "
            f"and save_pretrained/from_pretrained would drop them; save this model with hf_sparse.export instead",
            stacklevel=3,
        )
        return
    config.quantization_config = entry


def _safetensors_header(checkpoint_files: Optional[list[str]]) -> Optional[dict[str, torch.dtype]]:
    """Key -> stored dtype of every tensor, or None when the checkpoint is not (only) safetensors."""
    if not checkpoint_files or not all(str(f).endswith(".safetensors") for f in checkpoint_files):
        return None
    from safetensors import safe_open

    from ...format import safetensors_dtype

    header: dict[str, torch.dtype] = {}
    for file in checkpoint_files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                header[key] = safetensors_dtype(f.get_slice(key).get_dtype(), key)
    return header


class MergedSLoRBHfQuantizer(HfSparseLoaderBase):
    """Rebuild the SparseLinear modules a merged AST checkpoint names, then step aside (nothing is quantized)."""

    quantization_config: MergedSLoRBConfig  # only checkpoints that carry the entry load; a dense model never converts

    def _process_model_before_weight_loading(self, model, checkpoint_files: Optional[list[str]] = None, **kwargs):
        header = _safetensors_header(checkpoint_files)
        for name, entry in self.quantization_config.modules.items():
            where = f"quantization_config ({MERGED_SLORB_METHOD}).modules[{name!r}]"
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{where}: {type(model).__name__} has no module {name!r}") from None
            if not isinstance(module, (nn.Linear, Conv1D)):
                raise ValueError(f"{where}: {name} is a {type(module).__name__}, not a Linear/Conv1D")
            conv = isinstance(module, Conv1D)
            if conv != entry["fan_in_fan_out"]:
                raise ValueError(
                    f"{where}: fan_in_fan_out={entry['fan_in_fan_out']} but {name} is a {type(module).__name__}"
                )
            in_f, out_f = module.weight.shape if conv else module.weight.shape[::-1]
            k = entry["group_size"]
            if in_f % k:
                raise ValueError(f"{where}: in_features={in_f} is not divisible by group_size={k}")
            keys = [SLORB_WEIGHT] + ([SLORB_PROJECTION] if entry["train_projection"] else [])
            if header is not None and f"{name}.{LEGACY_WEIGHT}" in header:
                self._legacy_names = True  # saved by hf_sparse 0.1: slorb.S/X
            if self._legacy_names:
                keys = [legacy for legacy, new in LEGACY_SLORB_KEYS.items() if new in keys]
            dtypes = {}
            for key in keys:
                if header is not None and f"{name}.{key}" not in header:
                    raise ValueError(
                        f"{name}.{key} is missing from the checkpoint although {where} lists a SLoRB branch: "
                        f"incomplete or edited checkpoint (it would load randomly initialised)"
                    )
                dtypes[LEGACY_SLORB_KEYS.get(key, key)] = (
                    header[f"{name}.{key}"] if header is not None else module.weight.dtype
                )
            with torch.device("meta"):
                slorb = SLoRB(in_f, out_f, k, train_projection=entry["train_projection"])
            # the stored dtype (SLoRB is often fp32 on bf16)
            slorb.weight = nn.Parameter(slorb.weight.to(dtypes[SLORB_WEIGHT]))
            if slorb.projection is not None:
                slorb.projection = nn.Parameter(slorb.projection.to(dtypes[SLORB_PROJECTION]))
            model.set_submodule(name, SparseLinear.build(module.weight, module.bias, slorb, conv))
        return model

    _legacy_names = False

    def uses_legacy_slorb_names(self) -> bool:
        """Checkpoints merged by hf_sparse 0.1 name the branch's tensors ``slorb.S``/``slorb.X`` (seen in the header)."""
        return self._legacy_names

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name in self.quantization_config.modules:
            for pname, t in model.get_submodule(name).named_parameters():
                if t.device.type == "meta":
                    raise ValueError(f"{name}.{pname} was not loaded from the checkpoint")
        entry = self.quantization_config
        self.remove_quantization_config(model)  # not a quantized model: no hf_quantizer, is_quantized False
        model.config.quantization_config = entry  # kept, so the next save_pretrained writes it again
        return model


def register_merged_slorb() -> None:
    """Register ``quant_method="hf_sparse_slorb"`` with transformers (idempotent)."""
    register_transformers_quantizer(MERGED_SLORB_METHOD, MergedSLoRBConfig, MergedSLoRBHfQuantizer)
