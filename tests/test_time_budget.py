"""The wall-clock budget (hf_sparse.training.time_budget) and --precision auto (hf_sparse.training.precision)."""

from __future__ import annotations

import time

import pytest
from conftest import tiny_model
from test_training_utils import ast_args, hamlet_blocks
from transformers import TrainerCallback, default_data_collator

from hf_sparse import ASTConfig, ASTTrainer
from hf_sparse.training import precision
from hf_sparse.training.time_budget import TimeBudgetCallback, add_time_budget, parse_duration


@pytest.mark.parametrize("text, seconds", [("900", 900), (120, 120), ("90s", 90), ("15m", 900), ("1.5h", 5400),
                                           ("1h30m", 5400), (" 2 min ", 120)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "abc", "15 minutes", "0", "-5", "5m!", 0, float("nan")])
def test_parse_duration_refuses_bad_input(bad):
    with pytest.raises(ValueError, match="--time-budget"):
        parse_duration(bad)


class FakeClock(TrainerCallback):
    """A deterministic clock: every optimizer step costs ``step_s`` (``slow_after``: then ``slow_s``)."""

    def __init__(self, step_s: float, slow_after: int = 10**9, slow_s: float = 0.0):
        self.now, self.step_s, self.slow_after, self.slow_s = 0.0, step_s, slow_after, slow_s
        self.bar_totals: list[int] = []

    def __call__(self) -> float:
        return self.now

    def on_step_begin(self, args, state, control, **kwargs):
        self.now += self.step_s if state.global_step < self.slow_after else self.slow_s


def _trainer(tmp_path, clock, seconds, upper=10_000, **overrides):
    args = ast_args(tmp_path, max_steps=upper, per_device_train_batch_size=2, lr_scheduler_type="linear",
                    include_num_input_tokens_seen=True, ast_plot=False, logging_steps=1, **overrides)
    trainer = ASTTrainer(model=tiny_model("llama"), args=args, ast_config=ASTConfig(mask_update_interval=5),
                         train_dataset=hamlet_blocks(16, max_blocks=64), data_collator=default_data_collator,
                         callbacks=[clock] if isinstance(clock, TrainerCallback) else [])
    return trainer, add_time_budget(trainer, seconds, clock=clock)


class BarWatch(TrainerCallback):
    def __init__(self, budget: TimeBudgetCallback):
        self.budget, self.totals = budget, []

    def on_step_end(self, args, state, control, **kwargs):
        bar = getattr(self.budget.progress, "training_bar", None)
        if bar is not None:
            self.totals.append(bar.total)


def test_budget_fixes_the_step_count_from_the_measured_step_time(tmp_path):
    clock = FakeClock(step_s=0.5)
    trainer, budget = _trainer(tmp_path, clock, seconds=10.0, disable_tqdm=False)
    watch = BarWatch(budget)
    trainer.add_callback(watch)
    trainer.train()
    # step 1 is the warm-up; steps 2-4 measure 0.5 s; at 2.0 s elapsed 8 s are left: 8 / (0.5 * 1.05) = 15 more
    assert budget.step_s == pytest.approx(0.5)
    assert budget.planned_steps == 19 and trainer.state.global_step == 19 and trainer.state.max_steps == 19
    assert clock.now <= 10.0 and not budget.stopped_by_clock
    report = budget.report()
    assert report["steps"] == 19 and report["tokens"] == 19 * 2 * 16  # tokens trained, counted by the Trainer
    # the linear schedule was refitted: it reaches 0 exactly at the planned last step
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[-1] == pytest.approx(2e-3 / 19, rel=1e-6) and trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)
    # the progress bar (its ETA) shows the planned total from the moment it is known
    assert watch.totals[:3] == [10_000] * 3 and set(watch.totals[3:]) == {19}


def test_budget_stops_when_steps_get_slower_than_measured(tmp_path):
    clock = FakeClock(step_s=0.5, slow_after=6, slow_s=2.0)
    trainer, budget = _trainer(tmp_path, clock, seconds=10.0)
    trainer.train()
    assert budget.planned_steps == 19 and budget.stopped_by_clock
    assert trainer.state.global_step < 19 and clock.now - 2.0 < 10.0 <= clock.now  # stopped at the first step past


def test_budget_never_exceeds_the_upper_bound_and_real_clock_stops_in_time(tmp_path):
    trainer, budget = _trainer(tmp_path, time.perf_counter, seconds=1.5, upper=12)
    trainer.train()
    assert trainer.state.global_step <= 12 and budget.report()["tokens"] == trainer.state.global_step * 2 * 16
    trainer, budget = _trainer(tmp_path / "b", time.perf_counter, seconds=0.5, upper=100_000)
    start = time.perf_counter()
    trainer.train()
    assert 1 <= trainer.state.global_step < 100_000 and time.perf_counter() - start < 30  # generous: loaded CI


def test_time_budget_callback_refuses_bad_arguments():
    with pytest.raises(ValueError, match="seconds"):
        TimeBudgetCallback(0)
    with pytest.raises(ValueError, match="measure_steps"):
        TimeBudgetCallback(10, measure_steps=0)


# ---------------------------------------------------------------------------------------------- precision
def test_cpu_flags_decide_native_bf16(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16\n")
    assert precision.cpu_has_native_bf16(str(info)) is True
    info.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512bw\n")
    assert precision.cpu_has_native_bf16(str(info)) is False
    assert precision.cpu_has_native_bf16(str(tmp_path / "missing")) is None


def test_auto_on_a_cpu_without_any_bf16_is_fp32_without_timing(monkeypatch):
    monkeypatch.setattr(precision, "onednn_has_bf16", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    calls = []
    use, why = precision.choose_bf16("auto", "cpu", lambda bf16: calls.append(bf16))
    assert use is False and why == "CPU without bf16 support" and calls == []
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.choose_bf16("auto", "cpu", lambda bf16: calls.append(bf16)) == (True, "CPU with native bf16 matmuls")
    assert calls == []  # native bf16: chosen by the flag, nothing timed


def test_explicit_precision_and_bad_value():
    assert precision.choose_bf16("bf16", "cpu")[0] is True
    assert precision.choose_bf16("fp32", "cpu")[0] is False
    with pytest.raises(ValueError, match="precision"):
        precision.choose_bf16("fp16", "cpu")


def test_ambiguous_cpu_times_both_and_keeps_the_faster(monkeypatch):
    monkeypatch.setattr(precision, "onednn_has_bf16", lambda: True)  # as on an emulated-bf16 CPU, whatever this one is
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    calls = []

    def step(bf16: bool) -> None:
        calls.append(bf16)
        time.sleep(0.02 if bf16 else 0.001)

    use, why = precision.choose_bf16("auto", "cpu", step)
    assert use is False and "timed" in why and calls.count(True) == calls.count(False) == 3
    use, _ = precision.choose_bf16("auto", "cpu", lambda bf16: time.sleep(0.001 if bf16 else 0.02))
    assert use is True
    assert precision.choose_bf16("auto", "cpu")[0] is False  # nothing to time: fp32
