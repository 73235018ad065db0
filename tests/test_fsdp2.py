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
MAX_STEPS, INTERVAL, SAVE_STEP = 6, 2, 3  # 3 recomputes; a sharded checkpoint at step 3, between two


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _launch(out, base, *extra: str, mode: str = "--multi_gpu", script_args: tuple = ("fsdp",),
            resume: str = "") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", mode, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *extra,
           os.path.abspath(__file__), str(out), *script_args, str(base), resume]
    return _logged(out, subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240))


def _single(out, base) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.abspath(__file__), str(out), "single", str(base)]
    return _logged(out, subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240))


def _logged(out, proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    with open(os.path.join(out, "launch.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    return proc


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The dense tiny Llama every run starts from, saved like a Hub model (the adapters name it as their base)."""
    path = tmp_path_factory.mktemp("base")
    _tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def single_out(tmp_path_factory, base):
    out = tmp_path_factory.mktemp("single")
    _ok(_single(out, base))
    return out


@pytest.fixture(scope="module")
def single_run(single_out):
    return torch.load(single_out / "result.pt")


def test_single_process_run_logs_its_distributed_mode(single_out):
    assert "ASTTrainer: distributed mode single, world size 1 (backend none, device cpu)" in \
        (single_out / "launch.log").read_text()


@pytest.fixture(scope="module")
def fsdp_out(tmp_path_factory, base):
    """The uninterrupted FSDP2 run (TrainingArguments route); it writes a sharded checkpoint and the final model."""
    out = tmp_path_factory.mktemp("fsdp")
    _ok(_launch(out, base))
    return out


def _check_fsdp2_run(out, single: dict) -> None:
    info = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in info:  # it really was FSDP2: sharded DTensor parameters and masks, no DDP wrapper
        assert r["world_size"] == 2 and r["fsdp_module"] and r["teacher_fsdp_module"]
        assert r["weight_is_dtensor"] and r["mask_is_dtensor"] and r["teacher_weight_is_dtensor"]
        assert not r["ddp"]
    assert info[0]["gate_local_shape"] == [46, 64] and info[1]["gate_local_shape"] == [45, 64]  # 91 rows: uneven
    log = (out / "launch.log").read_text()  # the start-of-training line, once per rank
    assert log.count("ASTTrainer: distributed mode FSDP2, world size 2 (backend gloo, device cpu") == 2, log[-3000:]
    _check_same_run(torch.load(out / "result.pt"), single, steps=range(1, MAX_STEPS + 1))


def _check_same_run(fsdp: dict, single: dict, steps: range) -> None:
    """Losses at ``steps``, masks after every recompute within them, final counters, metrics and weights."""
    assert fsdp["steps_run"] == list(steps)  # the optimizer steps this run took (a resumed run: only the rest)
    assert set(steps) <= set(fsdp["losses"]) and set(steps) <= set(single["losses"])
    for step in steps:
        assert fsdp["losses"][step] == pytest.approx(single["losses"][step], rel=1e-5), step
        assert fsdp["learning_rates"][step] == pytest.approx(single["learning_rates"][step], rel=1e-9), step
    assert fsdp["num_recomputes"] == single["num_recomputes"] == MAX_STEPS // INTERVAL
    recomputes = [s for s in steps if s % INTERVAL == 0]
    assert sorted(fsdp["masks"]) == recomputes and set(recomputes) <= set(single["masks"])
    for step in recomputes:  # after every recompute
        assert torch.equal(fsdp["masks"][step], single["masks"][step]), step
    assert fsdp["flip_rate_vs_initial"] == single["flip_rate_vs_initial"] > 0  # the masks moved, identically
    assert fsdp["lambda"] == single["lambda"] > 0
    assert fsdp["metrics"] == pytest.approx(single["metrics"], rel=1e-5)
    assert fsdp["weights"].keys() == single["weights"].keys()
    for name, w in single["weights"].items():
        got = fsdp["weights"][name]
        if name.endswith(".merged"):  # the exported N:M weights, elementwise
            assert torch.allclose(got, w, rtol=1e-5, atol=1e-5 * float(w.abs().max())), name
        # every parameter as a whole (pruned dense entries have ~0 gradients, whose summation-order noise Adam's
        # g/sqrt(v) amplifies elementwise: measured 7e-5 of max|W| on one entry, 4e-6 in relative norm)
        assert float((got - w).norm() / w.norm()) < 1e-5, name


def test_fsdp2_trainer_arguments_two_cpu_processes_match_one_process(fsdp_out, single_run):
    """TrainingArguments(fsdp=True, fsdp_config={"version": 2, ...}) under a plain 2-process launch."""
    _check_fsdp2_run(fsdp_out, single_run)


def _input_sq(checkpoint) -> dict[str, torch.Tensor]:
    """The running activation sums a checkpoint holds (what the next recompute scores with)."""
    from safetensors.torch import load_file

    return {k.replace("._checkpoint_wrapped_module", ""): v
            for k, v in load_file(checkpoint / "ast_state.safetensors").items()}


def test_fsdp2_accelerate_config_two_cpu_processes_match_one_process(tmp_path, base, single_out, single_run):
    """The accelerate config route (what recipes/accelerate/fsdp2-cpu.yaml sets), no fsdp in the arguments, with
    FSDP2's activation checkpointing: the recompute in backward re-runs the AST input hooks, which must not count
    the activations twice (a uniform 2x would leave the masks unchanged: the sums themselves are compared)."""
    _ok(_launch(tmp_path, base, "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--fsdp_activation_checkpointing",
                "true", mode="--use_fsdp", script_args=("env",)))
    _check_fsdp2_run(tmp_path, single_run)
    assert all(json.loads((tmp_path / f"rank{r}.json").read_text())["activation_checkpointing"] for r in range(2))
    sharded, single = (_input_sq(o / "out" / f"checkpoint-{SAVE_STEP}") for o in (tmp_path, single_out))
    assert sharded.keys() == single.keys() and len(single) == 12
    for name, sq in single.items():
        assert float(sq.sum()) > 0
        torch.testing.assert_close(sharded[name], sq, rtol=1e-5, atol=0)


def test_fsdp2_resume_from_sharded_checkpoint_equals_uninterrupted_run(tmp_path, base, fsdp_out, single_run):
    """checkpoint-3 of the uninterrupted FSDP2 run is sharded (DCP model + optimizer, no full weights file); a
    fresh 2-process run resumed from it ends where the uninterrupted run (and the single process) ended."""
    from hf_sparse.training.checkpoints import is_complete_checkpoint

    checkpoint = fsdp_out / "out" / f"checkpoint-{SAVE_STEP}"
    names = set(os.listdir(checkpoint))
    assert {"pytorch_model_fsdp_0", "optimizer_0", "ast_state.safetensors", "trainer_state.json"} <= names, names
    assert not names & {"adapter_model.safetensors", "model.safetensors"}  # no full gather per checkpoint
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= names
    assert is_complete_checkpoint(str(checkpoint))
    _ok(_launch(tmp_path, base, resume=str(checkpoint)))
    resumed = torch.load(tmp_path / "result.pt")
    uninterrupted = torch.load(fsdp_out / "result.pt")
    _check_same_run(resumed, uninterrupted, steps=range(SAVE_STEP + 1, MAX_STEPS + 1))
    for name, w in uninterrupted["weights"].items():
        assert torch.allclose(resumed["weights"][name], w, rtol=1e-5, atol=1e-6), name


def test_fsdp2_final_model_exports_and_reloads_like_the_single_process_one(tmp_path, fsdp_out, single_out):
    """save_model() under FSDP2 writes one full AST adapter (rank 0, gathered masks); `hf-sparse export` takes it
    as it is, and the export loads with from_pretrained with the single-process export's logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import hf_sparse
    from hf_sparse.cli import main as cli
    from hf_sparse.modules.packed_linear import PackedNMLinear

    final = fsdp_out / "final"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(final))
    assert not [n for n in os.listdir(final) if n.startswith(("pytorch_model_fsdp", "optimizer"))]
    fsdp_sd = load_file(final / "adapter_model.safetensors")
    single_sd = load_file(single_out / "final" / "adapter_model.safetensors")
    assert fsdp_sd.keys() == single_sd.keys()
    mask_key = next(k for k in fsdp_sd if k.endswith("layers.0.mlp.gate_proj.ast_mask"))
    assert fsdp_sd[mask_key].shape == (91, 64) and torch.equal(fsdp_sd[mask_key], single_sd[mask_key])  # whole
    assert cli(["export", str(final), str(tmp_path / "fsdp_export")]) == 0
    hf_sparse.export(single_out / "final", tmp_path / "single_export")
    fsdp_model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp_export")
    single_model = AutoModelForCausalLM.from_pretrained(tmp_path / "single_export")
    assert isinstance(fsdp_model.model.layers[0].mlp.gate_proj, PackedNMLinear)
    ids = torch.randint(0, fsdp_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = fsdp_model(ids).logits, single_model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_fsdp1_is_refused_at_start_with_the_fsdp2_config(tmp_path, base):
    proc = _launch(tmp_path, base, "--fsdp_version", "1", "--fsdp_auto_wrap_policy", "NO_WRAP", mode="--use_fsdp",
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


def test_fsdp2_checkpoints_are_switched_to_sharded_and_save_only_model_is_refused(monkeypatch):
    """transformers' default FULL_STATE_DICT (a rank-0 gather at every save) becomes SHARDED_STATE_DICT."""
    import types

    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    from hf_sparse.training.fsdp import use_sharded_checkpoints

    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="FULL_STATE_DICT")
    use_sharded_checkpoints(plugin, types.SimpleNamespace(save_only_model=False))
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert type(plugin.state_dict_config).__name__ == "ShardedStateDictConfig"
    with pytest.raises(ValueError, match="FSDP2: `save_only_model=True` is not supported"):
        use_sharded_checkpoints(plugin, types.SimpleNamespace(save_only_model=True))


@pytest.mark.parametrize("name, layer_cls", [("llama-2-7b", "LlamaDecoderLayer"),
                                             ("llama-3.1-8b", "LlamaDecoderLayer"),
                                             ("qwen2.5-7b", "Qwen2DecoderLayer")])
def test_paper_scale_recipes_ask_for_fsdp2_with_the_paper_budget(name, layer_cls, monkeypatch):
    """The 7-8B recipes: FSDP2 (passes the refusal check), the model's decoder layer wrapped, FSDP2's activation
    checkpointing (not also transformers'), the paper's batch 128 x 4096 x 15k steps = 7.9B tokens and schedule."""
    import types

    from hf_sparse.training.recipe import load_recipe
    from hf_sparse.training.trainer import check_distributed_support

    for key in [k for k in os.environ if k.startswith(("ACCELERATE_USE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    recipe = load_recipe(os.path.join(HERE, "..", "recipes", f"{name}.yaml"))
    t = recipe["training"]
    check_distributed_support(types.SimpleNamespace(deepspeed=None, **t))
    fsdp_config = t["fsdp_config"]
    assert fsdp_config["fsdp_version"] == 2 and fsdp_config["transformer_layer_cls_to_wrap"] == [layer_cls]
    assert fsdp_config["activation_checkpointing"] is True and not t.get("gradient_checkpointing")
    assert recipe["launch"]["num_processes"] == 8
    sequences = t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * 8
    assert sequences == 128 and recipe["data"]["block_size"] == 4096
    assert sequences * 4096 * t["max_steps"] == 7_864_320_000  # the token budget
    assert (t["learning_rate"], t["warmup_steps"], t["lr_scheduler_type"]) == (2e-5, 500, "cosine")
    assert (t["distill_alpha"], t["teacher_dtype"], t["bf16"]) == (0.3333, "bfloat16", True)
    cfg = recipe.ast_config()
    assert (cfg.n, cfg.m, cfg.masked_decay_peak, cfg.masked_decay_ramp_steps, cfg.mask_update_interval) == \
        (2, 4, 6e-5, 3000, 10)


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


def _main(out: str, mode: str, base: str, resume: str = "") -> None:
    """``mode``: single | fsdp (TrainingArguments) | env (the launcher's FSDP config); ``resume``: a checkpoint to
    copy into this run's output dir and resume from. The base model is loaded from ``base`` (a saved tiny Llama)."""
    import shutil

    from test_training_utils import ast_args, hamlet_blocks
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM, TrainerCallback, default_data_collator

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
    run_dir = os.path.join(out, "out")
    if resume:
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:
            shutil.copytree(resume, os.path.join(run_dir, os.path.basename(resume)))
    args = ast_args(run_dir, max_steps=MAX_STEPS,
                    per_device_train_batch_size=8 if mode == "single" else 4,
                    gradient_accumulation_steps=2, logging_steps=1, ast_plot=False, learning_rate=5e-3,
                    save_strategy="steps", save_steps=SAVE_STEP, lr_scheduler_type="cosine", warmup_steps=2,
                    **extra)
    masks: dict[int, torch.Tensor] = {}
    steps_run: list[int] = []

    class RecordMasks(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            step = state.global_step + 1
            steps_run.append(step)
            if trainer.ast_callback.recompute_due(step):  # the AST callback ran first: recomputed at this step
                ast_model, _ = find_ast_model(trainer.model)
                masks[step] = torch.cat([_full(l.ast_mask["default"]).flatten() for _, l in ast_model.ast_layers()])

    trainer = ASTTrainer(model=AutoModelForCausalLM.from_pretrained(base), args=args, ast_config=config,
                         train_dataset=hamlet_blocks(32), data_collator=default_data_collator,
                         callbacks=[RecordMasks()])
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model(os.path.join(out, "final"))  # FSDP2: the full state dict, written once by rank 0
    ast_model, _ = find_ast_model(trainer.model)
    weights = {name: _full(p) for name, p in trainer.model.named_parameters()}
    for name, layer in ast_model.ast_layers():  # the merged (exactly N:M) target weights
        weights[name + ".merged"] = _full(layer.get_base_layer().weight) * _full(layer.ast_mask["default"])
    weights = {k.replace("._checkpoint_wrapped_module", ""): v for k, v in weights.items()}  # activation ckpt
    logs = [h for h in trainer.state.log_history if "loss" in h]
    callback = trainer.ast_callback
    result = {
        "losses": {h["step"]: h["loss"] for h in logs},
        "steps_run": steps_run,
        "masks": masks,
        "num_recomputes": callback.num_recomputes,
        "flip_rate_vs_initial": callback.last_flip["ast/flip_rate_vs_initial"],
        "lambda": callback.current_lambda,
        "metrics": {k: v for k, v in logs[-1].items() if k.startswith("ast/") and "seconds" not in k},
        "learning_rates": {h["step"]: h["learning_rate"] for h in logs},
        "weights": weights,
    }
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        torch.save(result, os.path.join(out, "result.pt"))
    if mode != "single":
        from torch.distributed.fsdp import FSDPModule

        layer = {n.replace("._checkpoint_wrapped_module", ""): l
                 for n, l in ast_model.ast_layers()}["model.layers.0.mlp.gate_proj"]
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
            "activation_checkpointing": any("_checkpoint_wrapped_module" in n
                                            for n, _ in trainer.model.named_modules()),
        }
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(info, f)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("hf_sparse").setLevel(logging.INFO)
    _main(*sys.argv[1:])
