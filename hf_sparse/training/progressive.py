"""The Trainer side of ``ASTConfig(schedule="progressive")``: the L1 decay's ramp and the final hard prune.

:class:`ProgressiveCallback` is attached by :func:`hf_sparse.training.callbacks.add_ast_callbacks` (so by
``ASTTrainer``) and does nothing for ``schedule="ast"``. Before every optimizer step it adds
``cast_decay·r(t)·sign(W)·¬M`` to the gradient of each target weight, ``r(t) = t / max_steps`` (0 -> 1 over the
run; a time budget that shortens the run shortens the ramp with it); the mask recomputes are the mask callback's,
every ``mask_update_interval`` steps. At the end of training it makes the one hard N:M prune with the scales folded
in (:func:`hf_sparse.tuners.ast.progressive.finalize_progressive`), so what the Trainer leaves is an ordinary 2:4
AST model that merges and exports as usual.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from transformers import TrainerCallback

from ..tuners.ast.model import find_ast_model
from ..tuners.ast.progressive import add_l1_decay_to_grad, finalize_progressive

logger = logging.getLogger(__name__)

__all__ = ["ProgressiveCallback", "progressive_ramp"]


def progressive_ramp(step: int, max_steps: int) -> float:
    """r(t) = t / T, clipped to [0, 1]."""
    return min(1.0, max(0.0, step / max(max_steps, 1)))


class ProgressiveCallback(TrainerCallback):
    """L1 decay ramp before each optimizer step and the final prune at train end (``schedule="progressive"``)."""

    def __init__(self) -> None:
        self.ast_model: Any = None
        self.current_decay = 0.0
        self.final: Optional[dict[str, float]] = None

    def on_train_begin(self, args, state, control, **kwargs: Any):
        self.ast_model, config = find_ast_model(kwargs["model"])
        if config.schedule != "progressive":
            self.ast_model = None
        else:
            self.decay = float(config.cast_decay)
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs: Any):
        if self.ast_model is not None:
            self.current_decay = self.decay * progressive_ramp(state.global_step + 1, state.max_steps)
            add_l1_decay_to_grad(self.ast_model, self.current_decay)
        return control

    def on_log(self, args, state, control, logs: Optional[dict] = None, **kwargs: Any):
        if self.ast_model is not None and logs is not None and "loss" in logs:
            logs["ast/cast_decay"] = self.current_decay
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["ast/cast_decay"] = self.current_decay  # the Trainer's copy
        return control

    def on_train_end(self, args, state, control, **kwargs: Any):
        if self.ast_model is not None:
            self.final = finalize_progressive(self.ast_model)
            logger.info("progressive schedule: final N:M prune of %d layers (removed %.1f%% of the scaled weights' "
                        "norm)", self.final["layers"], 100 * self.final["pruned_norm_fraction"])
        return control
