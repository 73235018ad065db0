"""AST training on the HF Trainer: ASTTrainer, its arguments, the masked-decay AdamW and the schedule callbacks."""

from .arguments import ASTTrainingArguments
from .callbacks import ASTMaskCallback, ASTPlotCallback, add_ast_callbacks, masked_decay_lambda
from .distill import distillation_loss_sums
from .mask_init import ASTOneShotInitCallback, ast_masks_need_init, initialize_ast_masks, set_ast_masks
from .optim import MaskedDecayAdamW
from .trainer import ASTTrainer, NonFiniteLossError, prepare_ast_model

__all__ = [
    "ASTOneShotInitCallback",
    "ASTMaskCallback",
    "ASTPlotCallback",
    "ASTTrainer",
    "ASTTrainingArguments",
    "MaskedDecayAdamW",
    "NonFiniteLossError",
    "add_ast_callbacks",
    "ast_masks_need_init",
    "distillation_loss_sums",
    "initialize_ast_masks",
    "masked_decay_lambda",
    "prepare_ast_model",
    "set_ast_masks",
]
