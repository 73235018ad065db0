"""Never lose a good checkpoint: the NaN/inf guard and atomic checkpoints of ASTTrainer (real runs, tiny models).

- A NaN gradient norm with a finite loss (a huge learning rate, or a NaN injected into a real gradient) stops
  training before the update; non-finite weights stop it before the save; no checkpoint ever holds a NaN and the
  error names the last checkpoint that is really complete and finite.
- A training process SIGKILLed while writing ``checkpoint-10`` resumes from ``checkpoint-5``; empty or half-written
  ``checkpoint-N`` folders (older versions, a plain Trainer) are skipped by ``resume_from_checkpoint=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from test_training_utils import ast_args, hamlet_blocks
from transformers import TrainerCallback, default_data_collator
from transformers.trainer_utils import get_last_checkpoint

from hf_sparse import ASTTrainer
from hf_sparse.training import NonFiniteLossError
from hf_sparse.training.checkpoints import (
    clean_interrupted_checkpoints,
    is_complete_checkpoint,
    last_complete_checkpoint,
    last_intact_checkpoint,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def _trainer(output_dir, callbacks=(), **overrides) -> ASTTrainer:
    kwargs = dict(max_steps=6, save_strategy="steps", save_steps=2, logging_steps=1, ast_plot=False)
    kwargs.update(overrides)
    return ASTTrainer(model=tiny_model("llama"), args=ast_args(output_dir, **kwargs), train_dataset=hamlet_blocks(32),
                      data_collator=default_data_collator, callbacks=list(callbacks))


def _nonfinite_files(root) -> list[str]:
    """Every *.safetensors under ``root`` holding a NaN/inf tensor."""
    bad = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".safetensors"):
                tensors = load_file(os.path.join(dirpath, name))
                if any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors.values()):
                    bad.append(os.path.join(dirpath, name))
    return bad


class StepRecorder(TrainerCallback):
    """The optimizer steps this run took (a resumed run starts after its checkpoint)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _checkpoints(root) -> list[str]:
    return sorted((e for e in os.listdir(root) if e.startswith("checkpoint-")), key=lambda e: int(e.split("-")[1]))


def test_huge_lr_nan_grad_norm_with_finite_loss_writes_no_nonfinite_checkpoint(tmp_path):
    """lr=1e8: the loss of step 2 is finite, its gradient norm NaN. Before: the update was applied, checkpoint-2
    held NaN weights and the error of step 3 called it intact."""
    trainer = _trainer(tmp_path, learning_rate=1e8)
    with pytest.raises(NonFiniteLossError, match=r"gradient norm.*step 2.*Last intact checkpoint.*: none"):
        trainer.train()
    finite_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(finite_losses) == 1 and torch.isfinite(torch.tensor(finite_losses)).all()  # step 1 only
    assert _nonfinite_files(tmp_path) == []
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # step 2's update was not applied


def test_nan_gradient_skips_the_update_and_names_the_last_finite_checkpoint(tmp_path):
    """A NaN injected into one real gradient at step 5 (loss finite): stopped before the optimizer step, the
    weights stay those of checkpoint-4, and the error names checkpoint-4."""
    trainer = _trainer(tmp_path, max_steps=10)
    param = next(p for n, p in trainer.model.named_parameters() if p.requires_grad and "q_proj" in n)
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("nan")) if calls["n"] == 5 else grad

    param.register_hook(poison)

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.step = state.global_step

    snap = Snapshot()
    trainer.add_callback(snap)
    with pytest.raises(NonFiniteLossError, match=r"gradient norm.*step 5.*checkpoint-4\b"):
        trainer.train()
    assert snap.step == 4 and trainer.state.global_step == 4
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, snap.weights[k]), k  # no update from the NaN gradient
    assert _checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-4"] and _nonfinite_files(tmp_path) == []


def test_nonfinite_weights_are_never_saved(tmp_path):
    """Weights turned NaN after step 4 (finite gradients): the save of checkpoint-4 raises instead of writing it."""

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 4:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("inf")

    trainer = _trainer(tmp_path, callbacks=[Poison()])
    with pytest.raises(NonFiniteLossError, match=r"weights.*step 4; checkpoint-4 was not written.*checkpoint-2\b"):
        trainer.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"] and _nonfinite_files(tmp_path) == []


def test_last_intact_checkpoint_checks_completeness_and_finiteness(tmp_path):
    """On real checkpoints: a NaN checkpoint-6 (older version), a half-written checkpoint-8 and an empty
    checkpoint-10 fool ``get_last_checkpoint``, not these."""
    _trainer(tmp_path, max_steps=4).train()
    nan6 = tmp_path / "checkpoint-6"
    shutil.copytree(tmp_path / "checkpoint-4", nan6)
    tensors = load_file(str(nan6 / "adapter_model.safetensors"))
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(nan6 / "adapter_model.safetensors"))
    shutil.copytree(tmp_path / "checkpoint-4", tmp_path / "checkpoint-8")
    os.remove(tmp_path / "checkpoint-8" / "trainer_state.json")
    (tmp_path / "checkpoint-10").mkdir()

    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert last_complete_checkpoint(str(tmp_path)) == str(nan6)
    assert last_intact_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert not is_complete_checkpoint(str(tmp_path / "checkpoint-8"))

    # a kill between the two renames that replace checkpoint-4: the new, complete copy is put in place
    os.rename(tmp_path / "checkpoint-4", tmp_path / "_checkpoint-4.old")
    (tmp_path / "_checkpoint-4.tmp").mkdir()
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "_checkpoint-4.tmp" / "checkpoint-4")
    clean_interrupted_checkpoints(str(tmp_path))
    assert not any(e.startswith("_") for e in os.listdir(tmp_path))
    assert json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 2
    # killed while the new one was still written: the old one comes back
    os.rename(tmp_path / "checkpoint-4", tmp_path / "_checkpoint-4.old")
    (tmp_path / "_checkpoint-4.tmp" / "checkpoint-4").mkdir(parents=True)
    clean_interrupted_checkpoints(str(tmp_path))
    assert not any(e.startswith("_") for e in os.listdir(tmp_path))
    assert is_complete_checkpoint(str(tmp_path / "checkpoint-4"))


@pytest.mark.parametrize("kind", ["empty", "partial"])
def test_resume_skips_an_empty_or_half_written_checkpoint(tmp_path, kind):
    """Before: ``ValueError: Can't find a valid checkpoint`` (empty) / ``FileNotFoundError: trainer_state.json``."""
    _trainer(tmp_path, max_steps=5, save_steps=5).train()
    broken = tmp_path / "checkpoint-10"
    if kind == "empty":
        broken.mkdir()
    else:
        shutil.copytree(tmp_path / "checkpoint-5", broken)
        os.remove(broken / "trainer_state.json")
    recorder = StepRecorder()
    resumed = _trainer(tmp_path, callbacks=[recorder], max_steps=10, save_steps=5)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 10 and recorder.steps == list(range(6, 11))  # from checkpoint-5
    assert _checkpoints(tmp_path) == ["checkpoint-5", "checkpoint-10"]
    assert is_complete_checkpoint(str(broken))  # replaced by the real one
    assert json.loads((broken / "trainer_state.json").read_text())["global_step"] == 10


_CHILD = """
import os, sys, time
sys.path.insert(0, {here!r})
from transformers import Trainer
import test_training_reliability as t

out, signal_file = sys.argv[1], sys.argv[2]
save_rng_state = Trainer._save_rng_state

def blocking_save_rng_state(self, output_dir):  # the save of checkpoint-10 hangs midway: the parent kills us
    save_rng_state(self, output_dir)
    if self.state.global_step == 10:
        with open(signal_file, "w") as f:
            f.write(output_dir)
        time.sleep(600)

Trainer._save_rng_state = blocking_save_rng_state
t._trainer(out, max_steps=15, save_steps=5).train()
"""


def test_sigkill_during_checkpoint_save_then_resume(tmp_path):
    """A real training process SIGKILLed while saving checkpoint-10 (model and optimizer written, trainer state
    not yet): ``train(resume_from_checkpoint=True)`` resumes from checkpoint-5 and finishes."""
    out, signal_file = tmp_path / "out", tmp_path / "saving"
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(here=HERE))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, str(script), str(out), str(signal_file)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not signal_file.exists():
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the child never reached the save of checkpoint-10"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=60)
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert "checkpoint-10" in signal_file.read_text()  # killed inside the save of checkpoint-10
    # whatever a checkpoint-N folder exists is complete; the half-written one is not under that name
    assert all(is_complete_checkpoint(str(out / c)) for c in _checkpoints(out))

    recorder = StepRecorder()
    resumed = _trainer(out, callbacks=[recorder], max_steps=15, save_steps=5)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 15 and recorder.steps == list(range(6, 16))  # from checkpoint-5
    assert _checkpoints(out) == ["checkpoint-5", "checkpoint-10", "checkpoint-15"]
    assert all(is_complete_checkpoint(str(out / c)) for c in _checkpoints(out))
    assert (out / "checkpoint-10" / "ast_state.safetensors").is_file()
    assert not any(e.startswith("_checkpoint") for e in os.listdir(out))  # the killed save's leftovers are gone


def test_leftovers_cleaned_rotation_and_best_checkpoint_kept(tmp_path):
    """A leftover staging folder is removed at the next start; ``save_total_limit`` and the best checkpoint
    work with atomic saves; every checkpoint holds the AST state (written before the rename)."""
    stale = tmp_path / "_checkpoint-4.tmp" / "checkpoint-4"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    trainer = ASTTrainer(
        model=tiny_model("llama"),
        args=ast_args(tmp_path, max_steps=8, save_strategy="steps", save_steps=2, eval_strategy="steps",
                      eval_steps=2, save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="loss",
                      greater_is_better=True, logging_steps=2, ast_plot=False),  # best = the worst: checkpoint-2
        train_dataset=hamlet_blocks(32), eval_dataset=hamlet_blocks(32, max_blocks=4),
        data_collator=default_data_collator,
    )
    trainer.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-8"]
    best = str(tmp_path / "checkpoint-2")  # the real folder, not the staging one it was written in
    assert trainer.state.best_model_checkpoint == best
    for c in ("checkpoint-2", "checkpoint-8"):
        assert is_complete_checkpoint(str(tmp_path / c)) and (tmp_path / c / "ast_state.safetensors").is_file()
        assert json.loads((tmp_path / c / "trainer_state.json").read_text())["best_model_checkpoint"] == best
