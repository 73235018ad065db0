"""One-shot N:M pruning baselines (magnitude, Wanda, SparseGPT) and the AST mask initialiser.

``prune_oneshot(model, "sparsegpt", calibration_ids)`` prunes a causal LM's decoder-block projections in
place (same targets as AST), processing decoder layers sequentially so each is calibrated on the outputs of
the already-pruned ones. New methods register with ``@register_pruner("name")``.
"""

from . import magnitude, sparsegpt, wanda  # noqa: F401  (register the built-in pruners)
from .api import prune_oneshot, select_targets
from .ast_init import ASTOneShotInitCallback, ast_masks_need_init, initialize_ast_masks, set_ast_masks
from .calibration import as_batches, calibration_ids_from_text, load_calibration_ids
from .magnitude import MagnitudePruner
from .registry import PRUNERS, OneShotPruner, get_pruner, register_pruner
from .sequential import find_decoder_layers, prune_sequential
from .sparsegpt import SparseGPTPruner
from .wanda import WandaPruner

__all__ = [
    "ASTOneShotInitCallback",
    "MagnitudePruner",
    "OneShotPruner",
    "PRUNERS",
    "SparseGPTPruner",
    "WandaPruner",
    "as_batches",
    "ast_masks_need_init",
    "calibration_ids_from_text",
    "find_decoder_layers",
    "get_pruner",
    "initialize_ast_masks",
    "load_calibration_ids",
    "prune_oneshot",
    "prune_sequential",
    "register_pruner",
    "select_targets",
    "set_ast_masks",
]
