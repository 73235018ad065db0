"""Registry of quantization methods for the kept values of N:M weights: name -> method, ``@register_quantization_method``.

A method packs ONE ``[out, in]`` weight under its bool N:M mask into a :class:`~hf_sparse.quantization.rtn.PackedWeight`
(the format's stored tensors). Methods that need calibration say so (``needs_calibration``); the exporter then
collects ``X^T X`` of each target's inputs and passes it as ``hessian``. Same pattern as the one-shot pruner registry.
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch

from ..format import NMSpec
from ..registry import Registry
from .gptq import pack_gptq
from .rtn import PackedWeight, pack_rtn

__all__ = ["QuantizationMethod", "QUANTIZATION_METHODS", "register_quantization_method", "get_quantization_method"]


class QuantizationMethod:
    """Base class: ``pack(weight, mask, spec, hessian)``; 16-bit specs store values as they are, whatever the method."""

    name: str = ""
    needs_calibration: bool = False

    def pack(self, weight: torch.Tensor, mask: torch.Tensor, spec: NMSpec,
             hessian: Optional[torch.Tensor] = None) -> PackedWeight:
        raise NotImplementedError


QUANTIZATION_METHODS = Registry("quantization method", argument="method", name_attribute="name")

_Q = TypeVar("_Q")


def register_quantization_method(name: str) -> Callable[[_Q], _Q]:
    """Class decorator: make a method available as ``hf_sparse.export(..., method=name)``."""
    return QUANTIZATION_METHODS.register(name)


def get_quantization_method(name: str) -> QuantizationMethod:
    """An instance of the method registered as ``name``; the error lists the known ones."""
    return QUANTIZATION_METHODS.get_entry(name)()


@register_quantization_method("rtn")
class RTN(QuantizationMethod):
    """Round-to-nearest per group: no data needed."""

    def pack(self, weight, mask, spec, hessian=None):
        return pack_rtn(weight, mask, spec)


@register_quantization_method("gptq")
class GPTQ(QuantizationMethod):
    """GPTQ that keeps the mask; needs the inputs' ``X^T X`` (16-bit specs need none and pack as RTN)."""

    needs_calibration = True

    def pack(self, weight, mask, spec, hessian=None):
        if spec.bits == 16:
            return pack_rtn(weight, mask, spec)
        if hessian is None:
            raise ValueError("method='gptq' needs a Hessian per target: pass argument `calibration_data`")
        return pack_gptq(weight, mask, hessian, spec)
