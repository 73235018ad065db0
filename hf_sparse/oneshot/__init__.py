"""One-shot N:M pruning baselines (magnitude, Wanda, SparseGPT); the AST mask initialiser built on them is
:mod:`hf_sparse.training.mask_init`.

``prune_oneshot(model, "sparsegpt", calibration_ids)`` prunes a causal LM's decoder-block projections in
place (same targets as AST), processing decoder layers sequentially so each is calibrated on the outputs of
the already-pruned ones. New methods register with ``@register_pruner("name")``.
"""

from . import magnitude, sparsegpt, wanda  # noqa: F401  (register the built-in pruners)
from .api import prune_oneshot, select_targets
from .experts import prune_experts_oneshot
from ..calibration import as_batches, calibration_ids_from_text, load_calibration_ids
from .magnitude import MagnitudePruner
from .registry import PRUNERS, OneShotPruner, get_pruner, register_pruner
from .sequential import find_decoder_layers, prune_sequential
from .sparsegpt import SparseGPTPruner
from .wanda import WandaPruner

__all__ = [
    "MagnitudePruner",
    "OneShotPruner",
    "PRUNERS",
    "SparseGPTPruner",
    "WandaPruner",
    "as_batches",
    "calibration_ids_from_text",
    "find_decoder_layers",
    "get_pruner",
    "load_calibration_ids",
    "prune_experts_oneshot",
    "prune_oneshot",
    "prune_sequential",
    "register_pruner",
    "select_targets",
]
