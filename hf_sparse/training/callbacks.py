"""Trainer callbacks that run AST's schedule; they work with a plain ``transformers.Trainer`` too.

- :class:`ASTMaskCallback`: the annealed masked-decay λ(t) (before each optimizer step), the mask recompute every
  Δt optimizer steps (right after the optimizer step, where the weights just changed), and logging of λ, flip rates
  (vs the previous and the initial mask), mask density per target group and the norms of kept/pruned weights
  through the Trainer's own ``log`` (so ``report_to`` integrations see them). Its counters and running activation
  norms are saved next to every checkpoint and restored on resume.
- :class:`ASTPlotCallback`: ``ast_training.png`` (loss, flip rate, λ vs step) in ``output_dir`` at train end.

With a plain ``Trainer`` use :func:`add_ast_callbacks` (it puts the mask callback first so the reporting
callbacks see its metrics).
"""

from __future__ import annotations

import json
import logging
import os
import time
import weakref
from collections import defaultdict
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..atomic import atomic_write
from ..sparsity.scores import activation_scaled_score, magnitude_score
from ..tuners.ast.config import ASTConfig
from ..tuners.ast.model import find_ast_model  # noqa: F401  (re-exported: it lived here)
from .expert_stats import expert_activation_scores, register_expert_activation_hooks
from .fsdp import is_sharded, local, update_masks_local
from .optim import MaskedDecayAdamW, unwrap_optimizer
from .plots import PLOT_FILE, plot_training

logger = logging.getLogger(__name__)

__all__ = [
    "ASTMaskCallback",
    "ASTPlotCallback",
    "add_ast_callbacks",
    "find_ast_model",
    "masked_decay_lambda",
    "AST_STATE_FILE",
    "PLOT_FILE",
]

AST_STATE_FILE = "ast_state.safetensors"


def masked_decay_lambda(step: int, peak: float, ramp_steps: int) -> float:
    """λ(t) = peak·t/T0 for t ≤ T0, then peak (the paper's annealed SR-STE schedule)."""
    if ramp_steps <= 0:
        return peak
    return peak * min(step, ramp_steps) / ramp_steps


def _group_of(name: str) -> str:
    """Target group of a module name: its last component ("q_proj", "c_fc"), so metrics stay few."""
    return name.rsplit(".", 1)[-1]


def _is_dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class ASTMaskCallback(TrainerCallback):
    """Masked-decay schedule, periodic mask recompute and AST metrics (see the module docstring).

    Args:
        config: overrides the AST config found in the model (rarely needed).
        log_norms: also log the Frobenius norms of kept and pruned target weights (cheap; shows the decay work).
    """

    def __init__(self, config: Optional[ASTConfig] = None, log_norms: bool = True) -> None:
        self._config_override = config
        self.log_norms = log_norms
        self.config: Optional[ASTConfig] = None
        self.ast_model: Any = None
        self.ramp_steps = 0
        self.current_lambda = 0.0
        self.last_flip: dict[str, float] = {}
        self.num_recomputes = 0
        self.recompute_seconds = 0.0
        self._input_sq: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._last_input: Optional[tuple[weakref.ref, torch.Tensor]] = None
        self._uses_optimizer_decay = False
        self._sharded = False  # FSDP2: masks are row-sharded DTensors (hf_sparse.training.fsdp)
        self._saved_step: Optional[int] = None  # step whose state ASTTrainer wrote into its staged checkpoint

    # ---- setup ----
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        model = kwargs["model"]
        self.ast_model, found = find_ast_model(model)
        self.config = self._config_override or found
        ramp = self.config.masked_decay_ramp_steps
        self.ramp_steps = int(ramp) if ramp is not None else max(1, int(0.25 * max(state.max_steps, 1)))
        optimizer = unwrap_optimizer(kwargs.get("optimizer"))
        self._uses_optimizer_decay = isinstance(optimizer, MaskedDecayAdamW)
        if self._uses_optimizer_decay:  # always: FSDP2 replaced the parameters the optimizer was built with
            optimizer.attach_masks(self.ast_model.model)
            self._uses_optimizer_decay = optimizer.has_masks
        self._sharded = any(is_sharded(layer.ast_mask[layer.active_adapters[0]])
                            for _, layer in [*self.ast_model.ast_layers(), *self.ast_model.ast_expert_layers()])
        if self.config.mask_score == "activation" and not self._hooks:
            self._register_activation_hooks()
        if state.global_step > 0:
            self._load_state(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        return control

    def _register_activation_hooks(self) -> None:
        ema = self.config.activation_norm_ema
        for name, layer in self.ast_model.ast_layers():
            def hook(module: nn.Module, inputs: tuple, name: str = name) -> None:
                if not module.training or not torch.is_grad_enabled():
                    return
                if torch._C._current_graph_task_id() != -1:
                    return  # activation checkpointing re-runs the forward inside backward: counted once already
                sq = self._input_sq_of(inputs[0])
                prev = self._input_sq.get(name)
                if prev is None:
                    self._input_sq[name] = sq.clone()
                elif ema is None:
                    prev.add_(sq)
                else:
                    prev.mul_(ema).add_(sq, alpha=1 - ema)
            self._hooks.append(layer.register_forward_pre_hook(hook))
        # fused MoE experts: per-expert routed inputs (hf_sparse.training.expert_stats)
        self._hooks += register_expert_activation_hooks(self.ast_model, self._input_sq, ema)

    def _input_sq_of(self, x: torch.Tensor) -> torch.Tensor:
        """Σ x² per input channel; q/k/v (and gate/up) see the same tensor: reduce it once, not per layer."""
        last = self._last_input
        if last is not None and last[0]() is x:
            return last[1]
        flat = x.detach().reshape(-1, x.shape[-1])
        sq = flat.float().pow(2).sum(0)
        self._last_input = (weakref.ref(x), sq)
        return sq

    # ---- λ(t): before the optimizer step ----
    def on_pre_optimizer_step(self, args, state, control, **kwargs: Any):
        if self.ast_model is None:
            return control
        step = state.global_step + 1
        if self.config.masked_decay_ramp_steps is None:  # 25% of training, which a time budget may shorten
            self.ramp_steps = max(1, int(0.25 * max(state.max_steps, 1)))
        self.current_lambda = masked_decay_lambda(step, self.config.masked_decay_peak, self.ramp_steps)
        if self._uses_optimizer_decay:
            unwrap_optimizer(kwargs["optimizer"]).set_masked_decay(self.current_lambda)
        elif self.current_lambda > 0:
            self.ast_model.apply_masked_decay(self.current_lambda, to_grad=True)  # SR-STE through the gradient
        return control

    # ---- mask recompute: right after the optimizer step ----
    def recompute_due(self, step: int) -> bool:
        cfg = self.config
        if cfg.mask_update_interval <= 0 or step < max(cfg.mask_update_start, 1):
            return False
        if cfg.mask_update_stop is not None and step > cfg.mask_update_stop:
            return False
        return step % cfg.mask_update_interval == 0

    def on_optimizer_step(self, args, state, control, **kwargs: Any):
        if self.ast_model is None or not self.recompute_due(state.global_step + 1):
            return control
        start = time.perf_counter()
        if self._sharded:  # FSDP2: each rank recomputes its own rows; flip counts summed over ranks
            scores = self._scores()  # experts: local ones, and which of them received no tokens
            flipped, flipped_init, numel = update_masks_local(self.ast_model, scores, self._keep_experts)
        else:
            scores = self._scores()  # also sets _keep_experts: experts that received no tokens keep their masks
            updates = self.ast_model.update_masks(scores, keep_experts=self._keep_experts)
            flipped = sum(u.flipped_vs_previous for u in updates.values())
            flipped_init = sum(u.flipped_vs_initial for u in updates.values())
            numel = sum(u.numel for u in updates.values())
        self.recompute_seconds += time.perf_counter() - start
        self.num_recomputes += 1
        self.last_flip = {
            "ast/flip_rate": flipped / max(numel, 1),
            "ast/flip_rate_vs_initial": flipped_init / max(numel, 1),
            "ast/last_recompute_step": float(state.global_step + 1),
        }
        if self.config.activation_norm_ema is None:
            self._input_sq.clear()
        return control

    def _scores(self) -> Optional[dict[str, torch.Tensor]]:
        self._keep_experts: Optional[dict[str, torch.Tensor]] = None
        if self.config.mask_score != "activation":
            return None
        scores = {}
        for name, layer in self.ast_model.ast_layers():
            weight = local(layer.get_base_layer().weight)  # FSDP2: this rank's rows
            sq = self._input_sq.get(name)
            if sq is None:
                sq = torch.zeros(layer.in_features, device=weight.device)
            if _is_dist():  # every rank saw different data: sum so that all ranks choose the same mask
                sq = sq.clone()
                torch.distributed.all_reduce(sq)
            if not bool(sq.any()):
                scores[name] = magnitude_score(weight)  # no activations seen yet: fall back to |W|
                continue
            scores[name] = activation_scaled_score(weight, sq.sqrt(), input_dim=layer.input_dim)
        expert_scores, self._keep_experts = expert_activation_scores(self.ast_model, self._input_sq, _is_dist())
        scores.update(expert_scores)
        return scores

    # ---- logging through the Trainer's log ----
    def metrics(self) -> dict[str, float]:
        """λ, the last recompute's flip rates, mask density per group and kept/pruned weight norms."""
        out: dict[str, float] = {"ast/lambda": self.current_lambda, **self.last_flip}
        kept_total, numel_total = defaultdict(int), defaultdict(int)
        kept_sq = pruned_sq = 0.0
        with torch.no_grad():
            targets = [(n, l, l.get_base_layer().weight) for n, l in self.ast_model.ast_layers()]
            targets += [(n, w, w.get_param()) for n, w in self.ast_model.ast_expert_layers()]  # fused MoE experts
            for name, layer, weight in targets:
                mask = local(layer.ast_mask[layer.active_adapters[0]])  # FSDP2: local rows, summed below
                group = _group_of(name)
                kept_total[group] += int(mask.sum())
                numel_total[group] += mask.numel()
                if self.log_norms:
                    w = local(weight).detach().float()
                    kept_sq += float((w * mask).pow(2).sum())
                    pruned_sq += float((w * ~mask).pow(2).sum())
        if getattr(self, "_sharded", False) and _is_dist():
            groups = sorted(kept_total)
            sums = torch.tensor([kept_total[g] for g in groups] + [numel_total[g] for g in groups]
                                + [kept_sq, pruned_sq], dtype=torch.float64)
            torch.distributed.all_reduce(sums)
            k = len(groups)
            kept_total = {g: int(sums[i]) for i, g in enumerate(groups)}
            numel_total = {g: int(sums[k + i]) for i, g in enumerate(groups)}
            kept_sq, pruned_sq = float(sums[2 * k]), float(sums[2 * k + 1])
        for group in sorted(kept_total):
            out[f"ast/density/{group}"] = kept_total[group] / max(numel_total[group], 1)
        if self.log_norms:
            out["ast/kept_weight_norm"] = kept_sq**0.5
            out["ast/pruned_weight_norm"] = pruned_sq**0.5
        if self.num_recomputes:
            out["ast/recompute_seconds"] = self.recompute_seconds
        return out

    def on_log(self, args, state, control, logs: Optional[dict] = None, **kwargs: Any):
        if self.ast_model is None or logs is None or "loss" not in logs:
            return control
        extra = self.metrics()
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)  # the Trainer appended its copy before calling on_log
        return control

    # ---- checkpoint/resume ----
    def on_save(self, args, state, control, **kwargs: Any):
        if self._saved_step == state.global_step:  # ASTTrainer already wrote it inside its atomic checkpoint
            return control
        self.save_state(args, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        return control

    def save_state(self, args: TrainingArguments, folder: str) -> None:
        """Write the AST counters and running activation norms into the checkpoint ``folder``.

        Every rank must call it (under DDP the ranks' norms are summed); the main process writes the file.
        """
        if self.ast_model is None:
            return
        input_sq = self._input_sq
        if _is_dist() and input_sq:  # save the ranks' sum (what _scores would use)
            input_sq = {k: v.clone() for k, v in sorted(input_sq.items())}
            for v in input_sq.values():
                torch.distributed.all_reduce(v)
        if not args.should_save or not os.path.isdir(folder):
            return
        tensors = {f"input_sq.{k}": v.detach().cpu().contiguous() for k, v in input_sq.items()}
        meta = {
            "current_lambda": json.dumps(self.current_lambda),
            "last_flip": json.dumps(self.last_flip),
            "num_recomputes": json.dumps(self.num_recomputes),
            "recompute_seconds": json.dumps(self.recompute_seconds),
        }
        atomic_write(os.path.join(folder, AST_STATE_FILE), lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def _load_state(self, folder: str) -> None:
        path = os.path.join(folder, AST_STATE_FILE)
        if not os.path.isfile(path):
            logger.warning("resuming without %s: AST counters and activation norms start fresh", path)
            return
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        self.current_lambda = json.loads(meta.get("current_lambda", "0.0"))
        self.last_flip = json.loads(meta.get("last_flip", "{}"))
        self.num_recomputes = json.loads(meta.get("num_recomputes", "0"))
        self.recompute_seconds = json.loads(meta.get("recompute_seconds", "0.0"))
        devices = {name: layer.get_base_layer().weight.device for name, layer in self.ast_model.ast_layers()}
        # the file holds the ranks' summed norms: rank 0 takes them, the others restart from zeros, so the next
        # all-reduce in _scores gives exactly what an uninterrupted run would have
        keep = not _is_dist() or torch.distributed.get_rank() == 0
        for key, value in load_file(path).items():
            name = key[len("input_sq."):]
            value = value.to(devices.get(name, "cpu"))
            self._input_sq[name] = value if keep else torch.zeros_like(value)

    def on_train_end(self, args, state, control, **kwargs: Any):
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        return control


class ASTPlotCallback(TrainerCallback):
    """Writes ``ast_training.png``: loss, flip rate and λ against the optimizer step (needs matplotlib)."""

    def on_train_end(self, args, state, control, **kwargs: Any):
        if not state.is_world_process_zero or not getattr(args, "ast_plot", True):
            return control
        try:
            path = plot_training(state.log_history, args.output_dir)
            logger.info("AST training plot written to %s", path)
        except ImportError:
            logger.warning("matplotlib is not installed: no %s (pip install 'hf-sparse[demo]')", PLOT_FILE)
        return control


def add_ast_callbacks(trainer: Any, config: Optional[ASTConfig] = None, plot: bool = True) -> ASTMaskCallback:
    """Attach the AST callbacks to any Trainer (ASTTrainer calls this too: the one place they are wired).

    Order: the one-shot mask initialiser (``ASTConfig.mask_init="wanda"|"sparsegpt"``), then the mask callback, both
    before every other callback so reporters see the AST metrics; the plot callback last.
    """
    from .mask_init import ASTOneShotInitCallback
    from .progressive import ProgressiveCallback

    callback = ASTMaskCallback(config)
    trainer.callback_handler.callbacks.insert(0, ProgressiveCallback())  # inactive unless schedule="progressive"
    trainer.callback_handler.callbacks.insert(0, callback)
    trainer.callback_handler.callbacks.insert(0, ASTOneShotInitCallback())
    if plot:
        trainer.add_callback(ASTPlotCallback())
    return callback
