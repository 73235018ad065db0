"""ASTTrainer: a ``transformers.Trainer`` that trains an N:M-sparse student with distillation from its dense self.

Turning a Trainer script into AST is two renames plus a teacher::

    trainer = ASTTrainer(model=model, args=ASTTrainingArguments(...), teacher_model=None,
                         train_dataset=ds, data_collator=collator)

- ``model`` may be a plain causal LM (wrapped with ``ast_config`` or the default :class:`ASTConfig`) or a PEFT AST
  model. ``teacher_model=None`` takes a frozen copy of the dense weights before wrapping.
- The teacher is kept on the trainer, not in the model: it never reaches the optimizer, checkpoints or the Hub.
- Loss = α·T²·KL(teacher‖student) + (1−α)·CE over real tokens (labels −100 and padding excluded), summed and
  divided by the token count of the whole accumulated batch, so gradient accumulation and DDP are exact.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional, Union

import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..oneshot.ast_init import ASTOneShotInitCallback
from ..tuners.ast.config import ASTConfig
from .arguments import ASTTrainingArguments
from .callbacks import ASTMaskCallback, ASTPlotCallback, find_ast_model
from .distill import IGNORE_INDEX, distillation_loss_sums
from .optim import MaskedDecayAdamW

logger = logging.getLogger(__name__)

__all__ = ["ASTTrainer", "NonFiniteLossError", "prepare_ast_model"]


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss became NaN or inf (raised before the optimizer step)."""


def _is_ast_peft_model(model: nn.Module) -> bool:
    try:
        find_ast_model(model)
        return True
    except TypeError:
        return False


def prepare_ast_model(model: nn.Module, ast_config: Optional[ASTConfig] = None) -> nn.Module:
    """Return ``model`` as an AST PEFT model: unchanged when it already is one, else wrapped with ``ast_config``."""
    if _is_ast_peft_model(model):
        if ast_config is not None:
            raise ValueError("argument `ast_config` given but `model` is already an AST PEFT model; pass one of them")
        return model
    if isinstance(model, PeftModel):
        raise TypeError(
            f"argument `model` is a PEFT model of type {model.peft_type!r}; ASTTrainer needs a plain model or an "
            "AST PEFT model (merge the other adapter first)"
        )
    return get_peft_model(model, ast_config or ASTConfig())


def frozen_teacher(model: nn.Module, dtype: Optional[torch.dtype] = None, device: Any = None) -> nn.Module:
    """A frozen, eval-mode dense copy of ``model`` (for an AST PEFT model: the dense base weights, no masks)."""
    if _is_ast_peft_model(model):
        teacher = copy.deepcopy(model).unload()  # AST layers -> their dense base modules
    else:
        teacher = copy.deepcopy(model)
    return freeze(teacher, dtype, device)


def freeze(model: nn.Module, dtype: Optional[torch.dtype] = None, device: Any = None) -> nn.Module:
    model.requires_grad_(False).eval()
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model


class ASTTrainer(Trainer):
    """The Adaptive Sparse Trainer on the HF Trainer (arXiv 2407.20584); see the module docstring.

    Args:
        model: plain causal LM or AST PEFT model.
        args: :class:`ASTTrainingArguments` (a plain ``TrainingArguments`` gets the AST defaults).
        teacher_model: dense teacher; ``None`` = frozen copy of the model's dense weights. Ignored when
            ``args.distill_alpha == 0``.
        ast_config: the :class:`ASTConfig` used to wrap a plain ``model`` (default: the paper's setup).
        **kwargs: everything ``transformers.Trainer`` takes (datasets, collator, callbacks, optimizers, ...).
    """

    # compute_loss divides by num_items_in_batch (the accumulated batch's token count): already GA-scaled.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        args: Optional[ASTTrainingArguments] = None,
        teacher_model: Optional[nn.Module] = None,
        ast_config: Optional[ASTConfig] = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("ASTTrainer: argument `model` is required")
        if args is None:
            args = ASTTrainingArguments(output_dir="trainer_output")
        elif not isinstance(args, ASTTrainingArguments):
            args = ASTTrainingArguments(**{k: v for k, v in args.to_dict().items() if k in _init_fields(args)})
        check_distributed_support(args)  # before copying a teacher or wrapping anything
        alpha = args.distill_alpha
        if alpha > 0 and teacher_model is None:
            teacher_model = frozen_teacher(model)  # before wrapping: the dense weights as they are now
        model = prepare_ast_model(model, ast_config)
        super().__init__(model=model, args=args, **kwargs)
        check_distributed_support(self.args, self)
        self.teacher_model: Optional[nn.Module] = None
        if alpha > 0:
            device = args.teacher_device or args.device
            self.teacher_model = freeze(teacher_model, args.teacher_torch_dtype, device)
        # our loss always needs the token count of the accumulated batch, counted over shifted labels
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.ast_callback = ASTMaskCallback()
        self.callback_handler.callbacks.insert(0, self.ast_callback)  # before reporters: they see AST metrics
        self.callback_handler.callbacks.insert(0, ASTPlotCallback()) if args.ast_plot else None
        # ASTConfig(mask_init="wanda"/"sparsegpt"): one-shot masks at the start of a fresh run, before the above
        self.callback_handler.callbacks.insert(0, ASTOneShotInitCallback())
        self._nonfinite_in_window = False
        self._loss_parts = {"ce": 0.0, "kl": 0.0, "tokens": 0}

    # ---- optimizer: the paper's masked-decay AdamW by default ----
    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        args = self.args
        default_optim = str(getattr(args.optim, "value", args.optim)).startswith("adamw_torch")
        if (
            self.optimizer is None
            and self.optimizer_cls_and_kwargs is None
            and args.ast_masked_decay_optimizer
            and default_optim
        ):
            self.optimizer_cls_and_kwargs = (
                MaskedDecayAdamW,
                {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon},
            )
        optimizer = super().create_optimizer(model)
        if isinstance(optimizer, MaskedDecayAdamW) and not optimizer.has_masks:
            optimizer.attach_masks(self.model)
        return optimizer

    # ---- loss ----
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ):
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(
                "ASTTrainer needs `labels` in every batch (e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False))"
            )
        labels = _mask_padding(labels, inputs.get("attention_mask"))
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        outputs = model(**model_inputs)
        training = model.training
        teacher_logits = None
        if training and self.teacher_model is not None:
            teacher_logits = self._teacher_logits(model_inputs)
        parts = distillation_loss_sums(
            outputs.logits,
            labels,
            teacher_logits,
            alpha=self.args.distill_alpha if training else 0.0,  # eval loss = the student's CE (perplexity)
            temperature=self.args.distill_temperature,
        )
        if num_items_in_batch is None:
            loss = parts.total / parts.num_tokens.clamp(min=1)
        else:
            loss = parts.total / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks
        if training:
            self._loss_parts["ce"] += float(parts.ce)
            self._loss_parts["kl"] += float(parts.kl)
            self._loss_parts["tokens"] += int(parts.num_tokens)
            if self.args.ast_stop_on_nonfinite_loss and not bool(torch.isfinite(loss.detach())):
                self._nonfinite_in_window = True
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _teacher_logits(self, model_inputs: dict[str, Any]) -> torch.Tensor:
        teacher = self.teacher_model
        device = next(teacher.parameters()).device
        moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in model_inputs.items()}
        mask = moved.get("attention_mask")
        if torch.is_tensor(mask) and mask.dim() == 2 and bool(mask.all()):
            # no padding: same logits, and the model takes its causal fast path (bf16: 0.15 s of a 1.0 s forward)
            moved.pop("attention_mask")
        return teacher(**moved).logits

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        for batch in batch_samples:  # padding never counts, even if the collator left labels on it
            if "labels" in batch and "attention_mask" in batch:
                batch["labels"] = _mask_padding(batch["labels"], batch["attention_mask"])
        return super()._get_num_items_in_batch(batch_samples, device)

    # ---- NaN/inf guard: checked once per optimizer step, agreed by all ranks, before the optimizer runs ----
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.args.ast_stop_on_nonfinite_loss and self.accelerator.sync_gradients:
            bad = torch.tensor(float(self._nonfinite_in_window), device=self.args.device)
            if self.accelerator.num_processes > 1:
                bad = self.accelerator.reduce(bad, reduction="sum")
            self._nonfinite_in_window = False
            if bool(bad > 0):
                last = get_last_checkpoint(self.args.output_dir) if _isdir(self.args.output_dir) else None
                raise NonFiniteLossError(
                    f"ASTTrainer: the training loss became NaN/inf at optimizer step {self.state.global_step + 1}; "
                    f"stopped before the optimizer step. Last checkpoint (intact): {last or 'none saved yet'}. "
                    "Lower the learning rate, check the data, or resume from that checkpoint."
                )
        return loss

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._loss_parts["tokens"]:
            tokens = self._loss_parts["tokens"]
            logs["ce_loss"] = round(self._loss_parts["ce"] / tokens, 6)
            if self.teacher_model is not None:
                logs["kl_loss"] = round(self._loss_parts["kl"] / tokens, 6)
            self._loss_parts = {"ce": 0.0, "kl": 0.0, "tokens": 0}
        super().log(logs, start_time)

    def create_model_card(self, **kwargs: Any) -> None:
        """Keep the hf_sparse card when ``output_dir`` holds an hf_sparse export (``push_to_hub`` calls this).

        Otherwise the Trainer's own card is written, tagged ``hf_sparse`` and ``2:4-sparse``.
        """
        from ..exporters.model_card import create_model_card_for_trainer

        if create_model_card_for_trainer(self, **kwargs):
            return
        tags = kwargs.pop("tags", None) or []
        tags = [tags] if isinstance(tags, str) else list(tags)
        kwargs["tags"] = tags + [t for t in ("hf_sparse", "2:4-sparse", "ast") if t not in tags]
        super().create_model_card(**kwargs)


def _isdir(path: str) -> bool:
    import os

    return os.path.isdir(path)


def _init_fields(args: Any) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(args) if f.init}


def _mask_padding(labels: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if attention_mask is None or attention_mask.shape != labels.shape:
        return labels
    return labels.masked_fill(attention_mask == 0, IGNORE_INDEX)


def check_distributed_support(args: TrainingArguments, trainer: Optional[Trainer] = None) -> None:
    """FSDP and DeepSpeed shard the weights the masks live beside: refuse them at start, clearly.

    Called with the arguments alone before any model or data is loaded (``hf-sparse train``, and first thing in
    ``ASTTrainer.__init__``), and again with the built trainer (accelerate's launch config may enable them).
    """
    import os

    env_true = lambda name: os.environ.get(name, "").lower() in ("1", "true", "yes")  # noqa: E731
    if (trainer is not None and trainer.is_fsdp_enabled) or args.fsdp or env_true("ACCELERATE_USE_FSDP"):
        raise NotImplementedError(
            "ASTTrainer does not support FSDP yet: masks, the masked-decay optimizer and the recompute need the "
            "full (unsharded) target weights. Use DDP (accelerate launch --multi_gpu), or a smaller model per GPU."
        )
    if (trainer is not None and trainer.is_deepspeed_enabled) or args.deepspeed or env_true("ACCELERATE_USE_DEEPSPEED"):
        raise NotImplementedError(
            "ASTTrainer does not support DeepSpeed yet: ZeRO partitions the weights the N:M masks apply to. "
            "Use DDP (accelerate launch --multi_gpu)."
        )
