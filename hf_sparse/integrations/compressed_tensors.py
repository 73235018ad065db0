"""Moved to :mod:`hf_sparse.exporters.compressed_tensors` (an export format); this name keeps old imports working."""

from ..exporters.compressed_tensors import export_compressed_tensors

__all__ = ["export_compressed_tensors"]
