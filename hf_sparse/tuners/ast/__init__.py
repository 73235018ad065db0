"""AST as a PEFT method: ``peft.get_peft_model(model, ASTConfig())`` after ``import hf_sparse``."""

from .config import AST_PEFT_TYPE, ASTConfig
from ...modules import SLoRB, SparseLinear  # re-exported: they were defined here before hf_sparse.modules
from .layer import ASTLayer, MaskUpdate, masked_decay_term, masked_weight_ste
from .merged import MERGED_SLORB_METHOD, MergedSLoRBConfig, register_merged_slorb
from .model import ASTModel, find_ast_model, resolve_targets


def register_ast_with_peft() -> None:
    """Make PEFT know the "AST" method (config, tuner, prefix); idempotent.

    ``peft.utils.register_peft_method`` only accepts names already in PEFT's ``PeftType`` enum, so a
    third-party method fills PEFT's three mappings itself, keyed by the string type.

    It also registers ``quant_method="hf_sparse_slorb"`` with transformers, so that a merged AST model with SLoRB
    (``merge_and_unload()``, then ``save_pretrained``) reloads with its branches (:mod:`.merged`).
    """
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[AST_PEFT_TYPE] = ASTConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[AST_PEFT_TYPE] = ASTModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[AST_PEFT_TYPE] = ASTModel.prefix
    register_merged_slorb()


__all__ = [
    "AST_PEFT_TYPE",
    "ASTConfig",
    "ASTLayer",
    "ASTModel",
    "MERGED_SLORB_METHOD",
    "MaskUpdate",
    "MergedSLoRBConfig",
    "SLoRB",
    "SparseLinear",
    "find_ast_model",
    "masked_decay_term",
    "masked_weight_ste",
    "register_ast_with_peft",
    "register_merged_slorb",
    "resolve_targets",
]
