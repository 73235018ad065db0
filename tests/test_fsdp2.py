"""FSDP2: ASTTrainer sharded over 2 CPU processes (gloo) matches one process on the same global batch.

Run as a script by the tests (``accelerate launch tests/test_fsdp2.py OUT fsdp`` and ``python tests/test_fsdp2.py OUT
single``); the tests compare what the runs wrote. The model is a tiny Llama whose gate/up projections have 91 output
rows (split 46 + 45 by FSDP2), with SLoRB, the activation score, a distillation teacher and gradient accumulation 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_STEPS, INTERVAL = 6, 2  # 3 recomputes


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _launch(out, *extra: str, mode: str = "--multi_gpu", script_args: tuple = ("fsdp",)) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", mode, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *extra,
           os.path.abspath(__file__), str(out), *script_args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)


def _single(out) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.abspath(__file__), str(out), "single"]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _ok(_single(out))
    return torch.load(out / "result.pt")


def _check_fsdp2_run(out, single: dict) -> None:
    info = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in info:  # it really was FSDP2: sharded DTensor parameters and masks, no DDP wrapper
        assert r["world_size"] == 2 and r["fsdp_module"] and r["teacher_fsdp_module"]
        assert r["weight_is_dtensor"] and r["mask_is_dtensor"] and r["teacher_weight_is_dtensor"]
        assert not r["ddp"]
    assert info[0]["gate_local_shape"] == [46, 64] and info[1]["gate_local_shape"] == [45, 64]  # 91 rows: uneven
    fsdp = torch.load(out / "result.pt")
    assert len(fsdp["losses"]) == len(single["losses"]) == MAX_STEPS
    for a, b in zip(fsdp["losses"], single["losses"]):
        assert a == pytest.approx(b, rel=1e-5)
    assert fsdp["num_recomputes"] == single["num_recomputes"] == MAX_STEPS // INTERVAL
    assert len(fsdp["masks"]) == len(single["masks"]) == MAX_STEPS // INTERVAL
    for a, b in zip(fsdp["masks"], single["masks"]):  # after every recompute
        assert torch.equal(a, b)
    assert fsdp["flip_rate_vs_initial"] == single["flip_rate_vs_initial"] > 0  # the masks moved, identically
    assert fsdp["metrics"] == pytest.approx(single["metrics"], rel=1e-5)
    assert fsdp["weights"].keys() == single["weights"].keys()
    for name, w in single["weights"].items():
        got = fsdp["weights"][name]
        if name.endswith(".merged"):  # the exported N:M weights, elementwise
            assert torch.allclose(got, w, rtol=1e-5, atol=1e-5 * float(w.abs().max())), name
        # every parameter as a whole (pruned dense entries have ~0 gradients, whose summation-order noise Adam's
        # g/sqrt(v) amplifies elementwise: measured 7e-5 of max|W| on one entry, 4e-6 in relative norm)
        assert float((got - w).norm() / w.norm()) < 1e-5, name


def test_fsdp2_trainer_arguments_two_cpu_processes_match_one_process(tmp_path, single_run):
    """TrainingArguments(fsdp=True, fsdp_config={"version": 2, ...}) under a plain 2-process launch."""
    _ok(_launch(tmp_path))
    _check_fsdp2_run(tmp_path, single_run)


def test_fsdp2_accelerate_config_two_cpu_processes_match_one_process(tmp_path, single_run):
    """The accelerate config route (what recipes/accelerate/fsdp2-cpu.yaml sets), no fsdp in the arguments."""
    _ok(_launch(tmp_path, "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", mode="--use_fsdp", script_args=("env",)))
    _check_fsdp2_run(tmp_path, single_run)


def test_fsdp1_is_refused_at_start_with_the_fsdp2_config(tmp_path):
    proc = _launch(tmp_path, "--fsdp_version", "1", "--fsdp_auto_wrap_policy", "NO_WRAP", mode="--use_fsdp",
                   script_args=("env",))  # the script asks for nothing: the launcher's FSDP1 is what is refused
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "ASTTrainer does not support FSDP1" in out and '"version": 2' in out and "fsdp_version: 2" in out


def test_fsdp1_and_deepspeed_arguments_are_refused(tmp_path, monkeypatch):
    from test_training_utils import ast_args

    from hf_sparse.training.trainer import check_distributed_support

    for key in [k for k in os.environ if k.startswith(("ACCELERATE_USE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    args = ast_args(tmp_path, fsdp=True, fsdp_config={"version": 1})
    with pytest.raises(NotImplementedError, match="does not support FSDP1.*fsdp_config=.*\"version\": 2"):
        check_distributed_support(args)
    check_distributed_support(ast_args(tmp_path, fsdp=True, fsdp_config={"version": 2}))  # FSDP2 passes
    args = ast_args(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(NotImplementedError, match="does not support DeepSpeed.*\"version\": 2"):
        check_distributed_support(args)


# ---- the script ----
def _tiny_llama(steps: int = 30) -> torch.nn.Module:
    import transformers
    from test_training_utils import hamlet_blocks

    from conftest import VOCAB

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                      intermediate_size=91, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    data = hamlet_blocks(64).blocks
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):  # a teacher worth distilling from; identical in every process
        batch = data[torch.randint(0, data.shape[0], (8,), generator=g)]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def _main(out: str, mode: str) -> None:
    from test_training_utils import ast_args, hamlet_blocks
    from torch.distributed.tensor import DTensor
    from transformers import TrainerCallback, default_data_collator

    from hf_sparse import ASTConfig, ASTTrainer
    from hf_sparse.training.callbacks import find_ast_model

    os.makedirs(out, exist_ok=True)
    sharded = mode == "fsdp"
    config = ASTConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
                       mask_update_interval=INTERVAL, masked_decay_peak=0.05, masked_decay_ramp_steps=4,
                       mask_score="activation", use_slorb=True, slorb_group_size=16)
    extra = {}
    if sharded:
        extra = dict(fsdp=True,
                     fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    args = ast_args(os.path.join(out, "out"), max_steps=MAX_STEPS,
                    per_device_train_batch_size=8 if mode == "single" else 4,
                    gradient_accumulation_steps=2, logging_steps=1, ast_plot=False, learning_rate=5e-3, **extra)
    masks: list[torch.Tensor] = []

    class RecordMasks(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            if trainer.ast_callback.num_recomputes > len(masks):  # the AST callback ran first: a recompute
                ast_model, _ = find_ast_model(trainer.model)
                masks.append(torch.cat([_full(l.ast_mask["default"]).flatten() for _, l in ast_model.ast_layers()]))

    trainer = ASTTrainer(model=_tiny_llama(), args=args, ast_config=config, train_dataset=hamlet_blocks(32),
                         data_collator=default_data_collator, callbacks=[RecordMasks()])
    trainer.train()
    ast_model, _ = find_ast_model(trainer.model)
    weights = {name: _full(p) for name, p in trainer.model.named_parameters()}
    for name, layer in ast_model.ast_layers():  # the merged (exactly N:M) target weights
        weights[name + ".merged"] = _full(layer.get_base_layer().weight) * _full(layer.ast_mask["default"])
    last_log = [h for h in trainer.state.log_history if "loss" in h][-1]
    result = {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "masks": masks,
        "num_recomputes": trainer.ast_callback.num_recomputes,
        "flip_rate_vs_initial": trainer.ast_callback.last_flip["ast/flip_rate_vs_initial"],
        "metrics": {k: v for k, v in last_log.items() if k.startswith("ast/") and "seconds" not in k},
        "weights": weights,
    }
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        torch.save(result, os.path.join(out, "result.pt"))
    if mode != "single":
        from torch.distributed.fsdp import FSDPModule

        layer = dict(ast_model.ast_layers())["model.layers.0.mlp.gate_proj"]
        teacher_weight = next(trainer.teacher_model.parameters())
        info = {
            "world_size": torch.distributed.get_world_size(),
            "fsdp_module": isinstance(trainer.model, FSDPModule),
            "teacher_fsdp_module": isinstance(trainer.teacher_model, FSDPModule),
            "weight_is_dtensor": isinstance(layer.get_base_layer().weight, DTensor),
            "mask_is_dtensor": isinstance(layer.ast_mask["default"], DTensor),
            "teacher_weight_is_dtensor": isinstance(teacher_weight, DTensor),
            "ddp": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
            "gate_local_shape": list(layer.get_base_layer().weight.to_local().shape),
        }
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(info, f)


if __name__ == "__main__":
    _main(*sys.argv[1:])
