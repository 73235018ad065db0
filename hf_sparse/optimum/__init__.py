"""hf_sparse as an Optimum backend: ``HfSparseQuantizer`` (an ``OptimumQuantizer``) and the
``optimum-cli export hf-sparse`` command. The inference entry point stays plain
``AutoModelForCausalLM.from_pretrained(export_dir)``, which routes every packed linear through
:mod:`hf_sparse.kernels.dispatch`.
"""

from .quantizer import HfSparseQuantizer

__all__ = ["HfSparseQuantizer"]
