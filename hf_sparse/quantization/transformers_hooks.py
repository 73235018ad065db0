"""What hf_sparse's two transformers quantizers share (the packed-export loader and the merged-SLoRB loader).

Both only *load* checkpoints hf_sparse wrote (``requires_calibration``: transformers never asks them to quantize a
dense model), are serializable and trainable, and rename hf_sparse 0.1's SLoRB tensor names (``slorb.S``/``slorb.X``)
to today's at load time through transformers' own ``WeightRenaming`` (plain names, so a re-save reverses them).
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.base import HfQuantizer

from ..format import LEGACY_SLORB_KEYS

__all__ = ["HfSparseLoaderBase", "register_transformers_quantizer"]


class HfSparseLoaderBase(HfQuantizer):
    """Base of the loaders: subclasses say whether the checkpoint uses the old SLoRB names."""

    requires_calibration = True  # loads pre-exported checkpoints only; never converts a dense model

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def uses_legacy_slorb_names(self) -> bool:
        return False

    def update_weight_conversions(self, weight_conversions, model):
        conversions = super().update_weight_conversions(weight_conversions, model)
        if not self.uses_legacy_slorb_names():
            return conversions
        from transformers.core_model_loading import WeightRenaming

        return [WeightRenaming(old, new) for old, new in LEGACY_SLORB_KEYS.items()] + list(conversions)

    def is_serializable(self, safe_serialization: bool = True) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register_transformers_quantizer(method: str, config_cls: type, quantizer_cls: type) -> None:
    """Register ``quant_method=method`` with transformers' quantizer registry (idempotent)."""
    from transformers.quantizers import auto

    if method not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(method)(config_cls)
    if method not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(method)(quantizer_cls)
