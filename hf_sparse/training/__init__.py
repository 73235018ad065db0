"""AST training on the HF Trainer: ASTTrainer, its arguments, the masked-decay AdamW and the schedule callbacks."""

from .arguments import ASTTrainingArguments
from .callbacks import ASTMaskCallback, ASTPlotCallback, add_ast_callbacks, masked_decay_lambda
from .distill import distillation_loss_sums
from .optim import MaskedDecayAdamW
from .trainer import ASTTrainer, NonFiniteLossError, prepare_ast_model

__all__ = [
    "ASTMaskCallback",
    "ASTPlotCallback",
    "ASTTrainer",
    "ASTTrainingArguments",
    "MaskedDecayAdamW",
    "NonFiniteLossError",
    "add_ast_callbacks",
    "distillation_loss_sums",
    "masked_decay_lambda",
    "prepare_ast_model",
]
