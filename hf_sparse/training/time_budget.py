"""A wall-clock budget for a Trainer run: measure the step time, then fix the step count so the run fits.

Why: a fixed ``max_steps`` takes 6 s/step on a CPU with native bf16 and 18 s/step on an AVX2-only one, so "15
minutes" holds only on the machine it was sized on. :class:`TimeBudgetCallback` times the first optimizer steps
(after one warm-up step, which pays for allocations and first-call overheads), then sets ``state.max_steps`` to
what fits in the budget and rebuilds the LR schedule for that length, so a cosine/linear schedule ends where
training ends and the progress bar's total (and so its ETA) is right. Training is also stopped outright once the
budget is spent (the machine got slower than measured). The Trainer must be started with ``max_steps`` as an
upper bound (the callback only lowers it): the data must hold that many steps.

    budget = add_time_budget(trainer, seconds=600)
    trainer.train()
    budget.report()  # {"budget_s", "steps", "step_s", "tokens", ...}
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any, Callable, Optional

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ProgressCallback

logger = logging.getLogger(__name__)

__all__ = ["TimeBudgetCallback", "add_time_budget", "parse_duration", "refit_lr_schedule"]

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(value: Any, argument: str = "--time-budget") -> float:
    """Seconds from ``900``, ``"900"``, ``"90s"``, ``"15m"``, ``"1.5h"``, ``"1h30m"``; a clear error otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*(min|h|m|s|)", text)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*(min|h|m|s|)", "", text).strip():
            raise ValueError(f"{argument}: expected seconds or a duration like '90s', '15m', '1h30m'; got {value!r}")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{argument}: the budget must be a positive duration, got {value!r}")
    return seconds


def _unwrap_scheduler(scheduler: Any) -> Any:
    while hasattr(scheduler, "scheduler") and not hasattr(scheduler, "lr_lambdas"):
        scheduler = scheduler.scheduler  # accelerate's AcceleratedScheduler
    return scheduler


def refit_lr_schedule(scheduler: Any, args: TrainingArguments, num_training_steps: int) -> bool:
    """Give a Trainer-built ``LambdaLR`` the lambdas of the same schedule for ``num_training_steps`` steps.

    The step counter and the optimizer stay; only the shape changes (built on a throwaway optimizer, so no
    learning rate is touched now). Returns False (and changes nothing) for a scheduler that is not a LambdaLR.
    """
    from transformers import get_scheduler

    scheduler = _unwrap_scheduler(scheduler)
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return False
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    fresh = get_scheduler(args.lr_scheduler_type, optimizer=probe,
                          num_warmup_steps=args.get_warmup_steps(num_training_steps),
                          num_training_steps=num_training_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    fresh = _unwrap_scheduler(fresh)
    if not isinstance(fresh, torch.optim.lr_scheduler.LambdaLR):
        return False
    scheduler.lr_lambdas = [fresh.lr_lambdas[0]] * len(scheduler.optimizer.param_groups)
    return True


class TimeBudgetCallback(TrainerCallback):
    """Fit the run into ``seconds`` of training wall-clock time (see the module docstring).

    Args:
        seconds: the training budget, counted from ``on_train_begin``.
        measure_steps: optimizer steps timed (after one warm-up step) before the step count is fixed.
        margin: the measured step time is multiplied by this (periodic mask recomputes and logging are not in
            every step).
        tokens_per_step: for :meth:`report` when the Trainer does not count input tokens.
        clock: seconds since some origin (default ``time.perf_counter``; tests pass a deterministic one).
    """

    def __init__(self, seconds: float, measure_steps: int = 3, margin: float = 1.05,
                 tokens_per_step: Optional[int] = None, clock: Callable[[], float] = time.perf_counter) -> None:
        if seconds <= 0:
            raise ValueError(f"TimeBudgetCallback: argument `seconds` must be > 0, got {seconds}")
        if measure_steps < 1:
            raise ValueError(f"TimeBudgetCallback: argument `measure_steps` must be >= 1, got {measure_steps}")
        self.seconds, self.measure_steps, self.margin = float(seconds), int(measure_steps), float(margin)
        self.tokens_per_step = tokens_per_step
        self.clock = clock
        self.progress: Optional[ProgressCallback] = None
        self._start = 0.0
        self._mark: Optional[tuple[int, float]] = None  # (step, time) after the warm-up step
        self.step_s: Optional[float] = None
        self.planned_steps: Optional[int] = None
        self.upper_bound = 0
        self.stopped_by_clock = False
        self.steps = 0
        self.tokens = 0
        self.train_s = 0.0

    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._start = self.clock()
        self.upper_bound = state.max_steps
        self._mark, self.step_s, self.planned_steps, self.stopped_by_clock = None, None, None, False
        return control

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs: Any):
        now = self.clock()
        elapsed = now - self._start
        if self._mark is None:
            self._mark = (state.global_step, now)  # the first step in this run: warm-up, not timed
        elif self.planned_steps is None and state.global_step - self._mark[0] >= self.measure_steps:
            self.step_s = (now - self._mark[1]) / (state.global_step - self._mark[0])
            fit = state.global_step + int((self.seconds - elapsed) / (self.step_s * self.margin))
            self.planned_steps = max(state.global_step, min(self.upper_bound, fit))
            state.max_steps = self.planned_steps
            if not refit_lr_schedule(kwargs.get("lr_scheduler"), args, self.planned_steps):
                logger.warning("time budget: the LR scheduler is not a LambdaLR; its length stays %d", self.upper_bound)
            self._resize_bar(self.planned_steps)
            logger.info("time budget %.0f s: %.2f s/step -> %d steps", self.seconds, self.step_s, self.planned_steps)
        if state.global_step >= state.max_steps:
            control.should_training_stop = True
        elif elapsed >= self.seconds:
            self.stopped_by_clock = True
            control.should_training_stop = True
            logger.warning("time budget %.0f s spent at step %d of %d: stopping (steps got slower than measured)",
                           self.seconds, state.global_step, state.max_steps)
        return control

    def on_train_end(self, args, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.train_s = self.clock() - self._start
        self.steps = state.global_step
        seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        self.tokens = seen if seen else state.global_step * int(self.tokens_per_step or 0)
        return control

    def _resize_bar(self, total: int) -> None:
        bar = getattr(self.progress, "training_bar", None)
        if bar is not None:
            bar.total = total
            bar.refresh()

    def report(self) -> dict[str, Any]:
        """What the budget did: budget, measured step time, planned and run steps, tokens trained, seconds."""
        return {"budget_s": self.seconds, "step_s": self.step_s, "planned_steps": self.planned_steps,
                "steps": self.steps, "tokens": self.tokens, "train_s": round(self.train_s, 1),
                "stopped_by_clock": self.stopped_by_clock}


def add_time_budget(trainer: Any, seconds: float, **kwargs: Any) -> TimeBudgetCallback:
    """Attach a :class:`TimeBudgetCallback` to ``trainer`` (and to its progress bar, whose total it resizes)."""
    callback = TimeBudgetCallback(seconds, **kwargs)
    callback.progress = next((c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback)), None)
    trainer.add_callback(callback)
    return callback
