"""ASTTrainer: a ``transformers.Trainer`` that trains an N:M-sparse student with distillation from its dense self.

Turning a Trainer script into AST is two renames plus a teacher::

    trainer = ASTTrainer(model=model, args=ASTTrainingArguments(...), teacher_model=None,
                         train_dataset=ds, data_collator=collator)

- ``model`` may be a plain causal LM (wrapped with ``ast_config`` or the default :class:`ASTConfig`) or a PEFT AST
  model. ``teacher_model=None`` takes a frozen copy of the dense weights before wrapping.
- The teacher is kept on the trainer, not in the model: it never reaches the optimizer, checkpoints or the Hub.
- Loss = α·T²·KL(teacher‖student) + (1−α)·CE over real tokens (labels −100 and padding excluded), summed and
  divided by the token count of the whole accumulated batch, so gradient accumulation and DDP are exact.
- NaN/inf guard (``ast_stop_on_nonfinite_loss``): a non-finite loss or gradient norm stops training before the
  optimizer step (no update applied), and non-finite weights stop it before a checkpoint is written; the error
  names the last checkpoint that is complete and finite on disk (:func:`last_intact_checkpoint`).
- Checkpoints are atomic: written into ``_checkpoint-N.tmp/`` beside the others and renamed to ``checkpoint-N``
  when complete (the AST state file included); leftovers of a killed save are cleaned at the next start or save,
  and ``train(resume_from_checkpoint=True)`` takes the last *complete* checkpoint (:func:`last_complete_checkpoint`).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Optional, Union

import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..tuners.ast.config import ASTConfig
from .arguments import ASTTrainingArguments
from .checkpoints import (
    clean_interrupted_checkpoints,
    commit_checkpoint,
    last_complete_checkpoint,
    last_intact_checkpoint,
)
from ..tuners.ast.model import find_ast_model
from .callbacks import add_ast_callbacks
from .distill import IGNORE_INDEX, distillation_loss_sums
from .fsdp import (
    FSDP2_CONFIG_HINT,
    distributed_mode,
    enable_fsdp2_on_cpu,
    fsdp_requested,
    is_sharded,
    local,
    save_full_model,
    shard_ast_masks,
    shard_teacher,
    use_sharded_checkpoints,
)
from .optim import MaskedDecayAdamW

logger = logging.getLogger(__name__)

__all__ = ["ASTTrainer", "NonFiniteLossError", "prepare_ast_model"]


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/inf: the loss or the gradient norm (raised before the optimizer step, so no update
    is applied), or the weights (raised before the checkpoint is written). The message names the last checkpoint
    that is complete and finite on disk."""


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
        if not any(getattr(c, "base_model_name_or_path", None) for c in getattr(model, "peft_config", {}).values()):
            logger.warning("ASTTrainer: the model names no base model (built from a config?): the saved adapter cannot "
                           "be exported; save the base and set `model.name_or_path` to it first (hf-sparse train does)")
        super().__init__(model=model, args=args, **kwargs)
        check_distributed_support(self.args, self)
        self.teacher_model: Optional[nn.Module] = None
        if alpha > 0:
            device = args.teacher_device or args.device
            self.teacher_model = freeze(teacher_model, args.teacher_torch_dtype, device)
        # our loss always needs the token count of the accumulated batch, counted over shifted labels
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.ast_callback = add_ast_callbacks(self, plot=args.ast_plot)
        self._nonfinite_in_window = False
        self._loss_parts = {"ce": 0.0, "kl": 0.0, "tokens": 0}
        self._staging_root: Optional[str] = None  # set while a checkpoint is being written (see _save_checkpoint)
        self._deferred_push = False

    # ---- FSDP2: accelerate's FSDP2 path, on CPU too; masks sharded like the weights; the teacher sharded ----
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # accelerate enables FSDP only on accelerator devices: on a multi-process CPU run it would train DDP
        # silently. Make the switch accelerate makes for GPUs (or raise: never an unsharded fallback).
        enable_fsdp2_on_cpu(self)
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if self.is_fsdp2 and plugin.cpu_ram_efficient_loading:
            # accelerate's rank-0 broadcast (fsdp2_load_full_state_dict) expects every state-dict entry to be a
            # sharded parameter; AST's mask buffers are not. The model is whole on every rank here anyway.
            logger.warning("ASTTrainer: FSDP2 cpu_ram_efficient_loading turned off (AST masks are buffers)")
            plugin.cpu_ram_efficient_loading = False
        if self.is_fsdp2:
            use_sharded_checkpoints(plugin, self.args)  # sharded checkpoints; save_model(): full model

    @property
    def is_fsdp2(self) -> bool:
        return bool(self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if self.is_fsdp2:
            self._shard_for_fsdp2(model)
        logger.info(distributed_mode(self))
        return model, train_dataloader

    def _shard_for_fsdp2(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(model, FSDPModule):
            raise RuntimeError(f"ASTTrainer: FSDP2 is enabled but the prepared model is a {type(model).__name__}, "
                               "not an FSDPModule; refusing to train unsharded")
        shard_ast_masks(find_ast_model(model)[0])
        if self.teacher_model is not None and not isinstance(self.teacher_model, FSDPModule):
            if self.args.teacher_device is not None:
                logger.warning("ASTTrainer: teacher_device=%s under FSDP2: the teacher stays whole on that device",
                               self.args.teacher_device)
                return
            plugin = self.accelerator.state.fsdp_plugin
            mesh = getattr(self.accelerator, "torch_device_mesh", None)
            if mesh is not None:
                mesh = mesh[tuple(self.accelerator.parallelism_config.fsdp_dim_names)]
            self.teacher_model = shard_teacher(self.teacher_model, plugin.transformer_cls_names_to_wrap,
                                               plugin.mixed_precision_policy, mesh)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Under FSDP2 the final model is gathered and written once by rank 0 (an AST adapter that
        ``hf_sparse.export`` takes); a checkpoint's model state is the sharded one (``_save_checkpoint``)."""
        if self.is_fsdp2 and self._staging_root is None:
            save_full_model(self, output_dir or self.args.output_dir)
            if self.args.push_to_hub and not _internal_call:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
            return
        super().save_model(output_dir, _internal_call)

    # ---- resume from the last *complete* checkpoint; clean what a killed save left ----
    def train(self, resume_from_checkpoint: Optional[Union[str, bool]] = None, trial: Any = None,
              ignore_keys_for_eval: Optional[list[str]] = None, **kwargs: Any):
        output_dir = self.args.output_dir
        if self.args.should_save and os.path.isdir(output_dir):
            clean_interrupted_checkpoints(output_dir)
        self.accelerator.wait_for_everyone()  # every rank then sees the same checkpoints
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            resume_from_checkpoint = last_complete_checkpoint(output_dir) if os.path.isdir(output_dir) else None
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({output_dir})")
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

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
            bad = self._all_ranks_any(self._nonfinite_in_window)
            self._nonfinite_in_window = False
            if bad:
                raise self._nonfinite_error(
                    f"the training loss became NaN/inf at optimizer step {self.state.global_step + 1}; stopped "
                    "before the optimizer step (no update applied)"
                )
        return loss

    def _get_grad_norm(self, model: nn.Module, grad_norm=None):
        """The Trainer's gradient norm (computed, and clipped, right before ``optimizer.step()``): a NaN/inf norm
        stops training before the update is applied. Under fp16 with a GradScaler an inf norm is the scaler's
        business (it skips that step and lowers the scale), so it is left to it."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.args.ast_stop_on_nonfinite_loss and grad_norm is not None and self.accelerator.scaler is None:
            if is_sharded(grad_norm):  # FSDP2: the DTensor-aware clip returns a replicated DTensor
                grad_norm = grad_norm.full_tensor()
            finite = torch.isfinite(torch.as_tensor(grad_norm, dtype=torch.float32).detach()).all()
            if self._all_ranks_any(~finite):
                raise self._nonfinite_error(
                    f"the gradient norm became NaN/inf at optimizer step {self.state.global_step + 1} (the loss was "
                    "finite); stopped before the optimizer step (no update applied)"
                )
        return grad_norm

    def _check_weights_finite(self, run_dir: str) -> None:
        device = self.args.device
        flags = [torch.isfinite(local(p).detach()).all().to(device)
                 for p in self.model.parameters() if p.is_floating_point()]
        if self._all_ranks_any(~torch.stack(flags).all() if flags else False):
            step = self.state.global_step
            raise self._nonfinite_error(
                f"the weights became NaN/inf after optimizer step {step}; {PREFIX_CHECKPOINT_DIR}-{step} was not "
                "written", run_dir,
            )

    def _all_ranks_any(self, flag: Union[bool, torch.Tensor]) -> bool:
        """True when ``flag`` is true on any rank (one all-reduce under DDP, so every rank takes the same branch)."""
        bad = torch.as_tensor(flag, dtype=torch.float32).to(self.args.device).reshape(())
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        return bool(bad > 0)

    def _nonfinite_error(self, what: str, run_dir: Optional[str] = None) -> NonFiniteLossError:
        run_dir = run_dir or self.args.output_dir
        last = last_intact_checkpoint(run_dir) if os.path.isdir(run_dir) else None
        return NonFiniteLossError(
            f"ASTTrainer: {what}. Last intact checkpoint (complete, finite weights): {last or 'none'}. "
            "Lower the learning rate, check the data, or resume from that checkpoint."
        )

    # ---- atomic checkpoints: written into _checkpoint-N.tmp/checkpoint-N, renamed into place when complete ----
    def _get_output_dir(self, trial: Any) -> str:
        # while a checkpoint is written, the Trainer's own _save_checkpoint writes into the staging folder
        return self._staging_root if self._staging_root is not None else super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._staging_root is not None:  # the hub upload runs in the background: push the final folder instead
            self._deferred_push = True
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint, written atomically and only with finite weights.

        ``Trainer._save_checkpoint`` writes everything (model, optimizer, scheduler, RNG states of every rank,
        trainer state) into ``run_dir/_checkpoint-N.tmp/checkpoint-N``; the AST state file follows; then the main
        process renames it to ``run_dir/checkpoint-N`` (other ranks wait) and rotates (``save_total_limit``).
        """
        step = self.state.global_step
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if self.args.ast_stop_on_nonfinite_loss:
            self._check_weights_finite(run_dir)
        staging = os.path.join(run_dir, f"_{name}.tmp")
        staged = os.path.join(staging, name)
        final = os.path.join(run_dir, name)
        if self.args.should_save:
            os.makedirs(run_dir, exist_ok=True)
            clean_interrupted_checkpoints(run_dir)  # includes a stale staging folder of this very step
            os.makedirs(staging)
        self.accelerator.wait_for_everyone()
        self._staging_root, self._deferred_push = staging, False
        try:
            super()._save_checkpoint(model, trial)
            if self.ast_callback in self.callback_handler.callbacks:  # part of the checkpoint: inside the rename
                self.ast_callback.save_state(self.args, staged)
                self.ast_callback._saved_step = step
            best = self.state.best_model_checkpoint
            if best is not None and os.path.dirname(os.path.normpath(best)) == os.path.normpath(staging):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))  # the real path
                if self.args.should_save:
                    self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()  # all ranks' files (rng_state_<rank>.pth) are in
        if self.args.should_save:
            commit_checkpoint(staged, final)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()  # on_save callbacks of every rank see checkpoint-N
        if self._deferred_push:
            self._deferred_push = False
            super()._push_from_checkpoint(final)

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


def _init_fields(args: Any) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(args) if f.init}


def _mask_padding(labels: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if attention_mask is None or attention_mask.shape != labels.shape:
        return labels
    return labels.masked_fill(attention_mask == 0, IGNORE_INDEX)


def check_distributed_support(args: TrainingArguments, trainer: Optional[Trainer] = None) -> None:
    """FSDP1 and DeepSpeed shard the weights into flat slices the masks cannot follow: refuse them at start, clearly
    (FSDP2 shards whole rows: supported, see :mod:`hf_sparse.training.fsdp`).

    Called with the arguments alone before any model or data is loaded (``hf-sparse train``, and first thing in
    ``ASTTrainer.__init__``), and again with the built trainer (accelerate's launch config may enable them).
    """
    import os

    env_true = lambda name: os.environ.get(name, "").lower() in ("1", "true", "yes")  # noqa: E731
    version = fsdp_requested(args)
    if trainer is not None and trainer.is_fsdp_enabled:
        version = getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1)
    if version is not None and version != 2:
        raise NotImplementedError(
            f"ASTTrainer does not support FSDP{version}: its flat parameters are 1-D slices that do not align to "
            f"weight rows, so N:M masks cannot follow them. {FSDP2_CONFIG_HINT}."
        )
    if (trainer is not None and trainer.is_deepspeed_enabled) or args.deepspeed or env_true("ACCELERATE_USE_DEEPSPEED"):
        raise NotImplementedError(
            "ASTTrainer does not support DeepSpeed: ZeRO partitions the weights into flat slices that do not align "
            f"to the rows the N:M masks apply to. For sharded training, {FSDP2_CONFIG_HINT[0].lower()}"
            f"{FSDP2_CONFIG_HINT[1:]}; otherwise DDP (accelerate launch --multi_gpu)."
        )
