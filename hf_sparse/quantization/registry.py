"""Registry of quantization methods for the kept values of N:M weights: name -> method, ``@register_quantization_method``.

A method packs ONE ``[out, in]`` weight under its bool N:M mask into a :class:`~hf_sparse.quantization.rtn.PackedWeight`
(the format's stored tensors). Methods that need calibration say so (``needs_calibration``); the exporter then
collects ``X^T X`` of each target's inputs and passes it as ``hessian``. Same pattern as the one-shot pruner registry.
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch

from ..format import NMSpec
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


QUANTIZATION_METHODS: dict[str, type[QuantizationMethod]] = {}

_Q = TypeVar("_Q", bound=type[QuantizationMethod])


def register_quantization_method(name: str) -> Callable[[_Q], _Q]:
    """Class decorator: make a method available as ``hf_sparse.export(..., method=name)``."""

    def wrap(cls: _Q) -> _Q:
        if name in QUANTIZATION_METHODS and QUANTIZATION_METHODS[name] is not cls:
            raise ValueError(f"a quantization method named {name!r} is already registered")
        cls.name = name
        QUANTIZATION_METHODS[name] = cls
        return cls

    return wrap


def get_quantization_method(name: str) -> QuantizationMethod:
    """An instance of the method registered as ``name``; the error lists the known ones."""
    try:
        return QUANTIZATION_METHODS[name]()
    except KeyError:
        raise ValueError(f"argument `method` must be one of {sorted(QUANTIZATION_METHODS)}, got {name!r}") from None


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
