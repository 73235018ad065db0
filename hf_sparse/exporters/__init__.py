"""Export N:M models as packed (optionally quantized) safetensors; see docs/format.md."""

from .api import collect_hessians, collect_sparse_linears, export, fake_quantize
from ..format import FORMAT_VERSION, FormatError, NMSpec

__all__ = ["FORMAT_VERSION", "FormatError", "NMSpec", "collect_hessians", "collect_sparse_linears", "export", "fake_quantize"]
