"""Resume: an interrupted-and-resumed AST run equals the uninterrupted one (losses, masks, weights)."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_training_utils import ast_args, hamlet_blocks, pretrained_tiny
from transformers import default_data_collator

from hf_sparse import ASTConfig, ASTTrainer
from hf_sparse.training.callbacks import find_ast_model


def _trainer(output_dir, score: str) -> ASTTrainer:
    config = ASTConfig(mask_update_interval=4, masked_decay_peak=0.05, masked_decay_ramp_steps=16, mask_score=score)
    args = ast_args(output_dir, max_steps=24, save_strategy="steps", save_steps=10, logging_steps=2, ast_plot=False,
                    lr_scheduler_type="cosine", warmup_steps=3)
    return ASTTrainer(model=pretrained_tiny("llama"), args=args, ast_config=config,
                      train_dataset=hamlet_blocks(48), data_collator=default_data_collator)


def _masks(trainer):
    ast_model, _ = find_ast_model(trainer.model)
    return {n: (l.ast_mask["default"].clone(), l.ast_initial_mask["default"].clone()) for n, l in ast_model.ast_layers()}


@pytest.mark.parametrize("score", ["magnitude", "activation"])
def test_resumed_run_matches_uninterrupted(tmp_path, score):
    full = _trainer(tmp_path / "full", score)
    full.train()
    full_losses = {h["step"]: h["loss"] for h in full.state.log_history if "loss" in h}
    full_masks = _masks(full)
    full_weights = {k: v.clone() for k, v in full.model.state_dict().items()}
    assert full.ast_callback.num_recomputes == 6

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-10", resumed_dir / "checkpoint-10")
    resumed = _trainer(resumed_dir, score)
    before = _masks(resumed)
    assert any(not torch.equal(before[n][0], full_masks[n][0]) for n in before)  # fresh model: other masks
    resumed.train(resume_from_checkpoint=True)
    resumed_losses = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h}

    assert set(resumed_losses) == set(full_losses)
    for step in range(12, 25, 2):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-4, abs=1e-5), step
    for name, (mask, initial) in _masks(resumed).items():
        assert torch.equal(mask, full_masks[name][0]), name
        assert torch.equal(initial, full_masks[name][1]), name
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, full_weights[k], rtol=1e-4, atol=1e-5)
    assert resumed.ast_callback.num_recomputes == 6  # counters came back with the checkpoint
