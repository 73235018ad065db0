"""ASTTrainingArguments: TrainingArguments plus the knobs of AST's distillation and teacher placement."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import TrainingArguments

from ..format import parse_dtype

__all__ = ["ASTTrainingArguments"]



@dataclass
class ASTTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for :class:`~hf_sparse.ASTTrainer`.

    The mask schedule (N:M, Δt, λ peak and ramp, score) lives in :class:`~hf_sparse.ASTConfig` because it is
    saved with the adapter; what only matters while training lives here.

    Args:
        distill_alpha: weight α of ``α·T²·KL(teacher‖student) + (1−α)·CE`` (paper: ≈0.67 for GPT-2, 0.5 for
            LLaMA). ``0`` trains on CE only and never runs the teacher.
        distill_temperature: softmax temperature T of the distillation term (paper: 2).
        teacher_dtype: dtype the teacher runs in (``"bfloat16"``, ``"float16"``, ``"float32"``); ``None`` keeps
            the student's dtype. A lower-precision teacher halves its memory.
        teacher_device: device of the teacher (e.g. ``"cuda:1"``, ``"cpu"``); ``None`` = the training device.
        ast_masked_decay_optimizer: build the paper's masked-decay AdamW by default (decay of pruned weights kept
            out of the first moment). ``False`` uses the Trainer's optimizer and adds the decay to the gradient.
        ast_plot: write ``ast_training.png`` (loss, flip rate, λ vs step) into ``output_dir`` at the end.
        ast_stop_on_nonfinite_loss: stop with :class:`NonFiniteLossError` when the loss or the gradient norm is
            NaN/inf (before the optimizer step: no update is applied) or the weights are (before a checkpoint is
            written: no checkpoint ever holds a NaN); the error names the last complete, finite checkpoint.
        ast_calibration_samples: with ``ASTConfig(mask_init="wanda"|"sparsegpt")``, the first this many sequences
            of the train dataloader calibrate the one-shot initial mask (once, at the start of a fresh run).
    """

    distill_alpha: float = field(default=0.67, metadata={"help": "weight of the KL(teacher||student) term"})
    distill_temperature: float = field(default=2.0, metadata={"help": "distillation softmax temperature"})
    teacher_dtype: Optional[str] = field(default=None, metadata={"help": "teacher dtype: bfloat16|float16|float32"})
    teacher_device: Optional[str] = field(default=None, metadata={"help": "teacher device; default training device"})
    ast_masked_decay_optimizer: bool = field(default=True, metadata={"help": "use the masked-decay AdamW"})
    ast_plot: bool = field(default=True, metadata={"help": "write ast_training.png at train end"})
    ast_stop_on_nonfinite_loss: bool = field(default=True, metadata={"help": "stop on NaN/inf loss, grad norm or weights"})
    ast_calibration_samples: int = field(
        default=32, metadata={"help": "train sequences used to calibrate mask_init='wanda'/'sparsegpt'"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"ASTTrainingArguments: argument `distill_alpha` must be in [0, 1], got {self.distill_alpha}")
        if self.distill_temperature <= 0:
            raise ValueError(
                f"ASTTrainingArguments: argument `distill_temperature` must be > 0, got {self.distill_temperature}"
            )
        if self.ast_calibration_samples < 1:
            raise ValueError(
                f"ASTTrainingArguments: argument `ast_calibration_samples` must be >= 1, got {self.ast_calibration_samples}"
            )
        if self.teacher_dtype is not None:
            try:
                parse_dtype(self.teacher_dtype, "teacher_dtype", allow_auto=False)
            except ValueError as err:
                raise ValueError(f"ASTTrainingArguments: {err} or None") from None

    @property
    def teacher_torch_dtype(self) -> Optional[torch.dtype]:
        return parse_dtype(self.teacher_dtype, "teacher_dtype", allow_auto=False)
