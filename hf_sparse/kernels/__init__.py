"""Compute for packed N:M linears: the one dispatch function choosing a kernel, the autotuner and the kernels.

Knows the packed tensors (:mod:`hf_sparse.format`) and the module interface (:class:`dispatch.PackedNMLinear`, a
Protocol), nothing of PEFT, the exporter or the module classes (:mod:`hf_sparse.modules` sits above).
"""

from .dispatch import PATHS, choose_path, tune_model

__all__ = ["PATHS", "choose_path", "tune_model"]
