"""The inference modules of N:M models, the package's bottom layer beside the format.

``SLoRB`` (the low-rank branch), ``SparseLinear`` (dense N:M weight + SLoRB, what a merge leaves) and
``PackedNMLinear`` (the loaded export: packed values/positions/scales, compute through the kernel dispatch).
They depend on :mod:`hf_sparse.format` and :mod:`hf_sparse.kernels` only: loading a checkpoint imports neither
PEFT nor the exporter.
"""

from .packed_linear import PackedNMLinear
from .slorb import SLoRB, slorb_mean_init
from .sparse_linear import SparseConv1D, SparseLinear, linear_forward

__all__ = ["PackedNMLinear", "SLoRB", "SparseConv1D", "SparseLinear", "linear_forward", "slorb_mean_init"]
