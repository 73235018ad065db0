"""Compute for packed N:M linears: the module and the one dispatch function choosing its kernel."""

from .dispatch import PATHS, choose_path
from .packed_linear import PackedNMLinear

__all__ = ["PATHS", "PackedNMLinear", "choose_path"]
