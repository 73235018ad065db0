"""Export N:M models: packed (optionally quantized) hf_sparse safetensors, or compressed-tensors; see docs/format.md.

Formats are registered in :data:`EXPORT_FORMATS` (name -> ``export(model, out_dir, quantization_config, **kw)``),
the names ``hf-sparse export --format`` takes.
"""

from ..format import FORMAT_VERSION, FormatError, NMSpec
from ..quantization.config import HfSparseConfig
from ..registry import Registry
from .api import collect_hessians, collect_sparse_linears, export, fake_quantize
from .compressed_tensors import export_compressed_tensors

EXPORT_FORMATS = Registry("export format", argument="--format")
EXPORT_FORMATS.register("hf_sparse")(export)
EXPORT_FORMATS.register("compressed-tensors")(export_compressed_tensors)

__all__ = [
    "EXPORT_FORMATS", "FORMAT_VERSION", "FormatError", "HfSparseConfig", "NMSpec", "collect_hessians",
    "collect_sparse_linears", "export", "export_compressed_tensors", "fake_quantize",
]
