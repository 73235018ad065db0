"""N:M mask math: masks from scores, scores, and compact storage of N:M matrices."""

from .nm import input_dim_of, is_nm_sparse, nm_mask, nm_violations, validate_nm
from .packing import compress_nm, decompress_nm, pack_bits, position_bits, unpack_bits
from .scores import activation_scaled_score, magnitude_score

__all__ = [
    "activation_scaled_score",
    "compress_nm",
    "decompress_nm",
    "input_dim_of",
    "is_nm_sparse",
    "magnitude_score",
    "nm_mask",
    "nm_violations",
    "pack_bits",
    "position_bits",
    "unpack_bits",
    "validate_nm",
]
