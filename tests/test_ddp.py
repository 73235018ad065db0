"""DDP: ASTTrainer under `accelerate launch` with 2 CPU processes (gloo); masks identical on every rank.

Run as a script by the test (``accelerate launch tests/test_ddp.py OUT``); the test reads what each rank wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _launch(tmp_path, mode: str = "--multi_gpu", *extra: str, script_args: tuple = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", mode, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", *extra, os.path.abspath(__file__), str(tmp_path),
           *script_args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def test_ddp_two_cpu_processes_same_masks(tmp_path):
    proc = _launch(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert {r["world_size"] for r in ranks} == {2}
    assert ranks[0]["mask_digest"] == ranks[1]["mask_digest"]
    assert ranks[0]["weight_digest"] == pytest.approx(ranks[1]["weight_digest"], rel=1e-6)
    assert ranks[0]["num_recomputes"] == ranks[1]["num_recomputes"] == 3
    assert ranks[0]["flip_rate_vs_initial"] > 0  # the masks did move, together
    assert (tmp_path / "out" / "checkpoint-12" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoint-6" / "ast_state.safetensors").is_file()


def test_ddp_resume_matches_uninterrupted_with_activation_scores(tmp_path):
    """Checkpoint mid-interval (running input norms pending): the resumed 2-rank run reaches the same masks."""
    import shutil

    full = tmp_path / "full"
    proc = _launch(full)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "out" / "checkpoint-6", resumed / "out" / "checkpoint-6")
    proc = _launch(resumed, script_args=("resume",))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    a = json.loads((full / "rank0.json").read_text())
    b = [json.loads((resumed / f"rank{r}.json").read_text()) for r in range(2)]
    assert b[0]["mask_digest"] == b[1]["mask_digest"] == a["mask_digest"]
    assert b[0]["weight_digest"] == pytest.approx(a["weight_digest"], rel=1e-5)


# FSDP2 runs (tests/test_fsdp2.py); FSDP1 is refused: test_fsdp2.py::test_fsdp1_is_refused_at_start_with_the_fsdp2_config


def _main(out: str, mode: str = "full") -> None:
    from test_training_utils import ast_args, hamlet_blocks, pretrained_tiny
    from transformers import default_data_collator

    from hf_sparse import ASTConfig, ASTTrainer
    from hf_sparse.training.callbacks import find_ast_model

    config = ASTConfig(mask_update_interval=4, masked_decay_peak=0.05, masked_decay_ramp_steps=8,
                       mask_score="activation")
    args = ast_args(os.path.join(out, "out"), max_steps=12, per_device_train_batch_size=4, save_strategy="steps",
                    save_steps=6, ast_plot=False, learning_rate=5e-3)
    trainer = ASTTrainer(model=pretrained_tiny("llama", steps=40), args=args, ast_config=config,
                         train_dataset=hamlet_blocks(32), data_collator=default_data_collator)
    resume = os.path.join(out, "out", "checkpoint-6") if mode == "resume" else None
    trainer.train(resume_from_checkpoint=resume)
    ast_model, _ = find_ast_model(trainer.model)
    masks = torch.cat([l.ast_mask["default"].flatten() for _, l in ast_model.ast_layers()])
    weights = torch.cat([l.get_base_layer().weight.detach().flatten() for _, l in ast_model.ast_layers()])
    digest = int((masks.long() * torch.arange(masks.numel()) % 1000003).sum())
    rank = torch.distributed.get_rank()
    result = {
        "world_size": torch.distributed.get_world_size(),
        "mask_digest": digest,
        "weight_digest": float(weights.double().abs().sum()),
        "num_recomputes": trainer.ast_callback.num_recomputes,
        "flip_rate_vs_initial": trainer.ast_callback.last_flip.get("ast/flip_rate_vs_initial", 0.0),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    _main(*sys.argv[1:])
