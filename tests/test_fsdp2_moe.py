"""FSDP2 with fused MoE expert targets: 2 CPU processes (gloo) match one process on the same global batch.

A tiny Mixtral with 3 experts (top-2): FSDP2 shards each ``[E, ., .]`` expert parameter on dim 0, the expert index,
2 + 1 experts per rank, and the expert masks the same way. Run as a script by the tests (``accelerate launch
tests/test_fsdp2_moe.py OUT fsdp BASE`` and ``python tests/test_fsdp2_moe.py OUT single BASE``); the tests compare
what the runs wrote: losses, every mask after every recompute, the routed-token counts of a checkpoint, the final
weights, a resume from the sharded checkpoint and the exported model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_STEPS, INTERVAL, SAVE_STEP = 4, 2, 3  # 2 recomputes; a sharded checkpoint between them
EXPERTS = 3  # odd: torch.chunk gives rank 0 two experts, rank 1 one


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(out, cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    with open(os.path.join(out, "launch.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe_base")
    _tiny_mixtral().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def single_out(tmp_path_factory, base):
    out = tmp_path_factory.mktemp("moe_single")
    _run(out, [sys.executable, os.path.abspath(__file__), str(out), "single", str(base)])
    return out


def _launch(out, base, resume: str = "") -> None:
    _run(out, [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               os.path.abspath(__file__), str(out), "fsdp", str(base), resume])


@pytest.fixture(scope="module")
def fsdp_out(tmp_path_factory, base):
    out = tmp_path_factory.mktemp("moe_fsdp")
    _launch(out, base)
    return out


def _ast_state(checkpoint) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(checkpoint / "ast_state.safetensors")


def test_fsdp2_moe_two_cpu_processes_match_one_process(fsdp_out, single_out):
    single, fsdp = (torch.load(o / "result.pt") for o in (single_out, fsdp_out))
    info = [json.loads((fsdp_out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in info:  # really FSDP2: expert parameters and their masks are DTensors sharded on the expert index
        assert r["world_size"] == 2 and r["fsdp_module"] and not r["ddp"]
        assert r["expert_is_dtensor"] and r["expert_mask_is_dtensor"] and r["placements"] == ["S(0)"] * 2
    for key in ("gate_up", "down"):  # whole experts per rank: 2 + 1 of 3, each expert matrix complete
        full = info[0][f"{key}_shape"]
        assert full[0] == EXPERTS and info[0][f"{key}_local_shape"] == [2, *full[1:]], (key, info)
        assert info[1][f"{key}_local_shape"] == [1, *full[1:]], (key, info)
    log = (fsdp_out / "launch.log").read_text()
    assert log.count("ASTTrainer: distributed mode FSDP2, world size 2 (backend gloo, device cpu") == 2, log[-3000:]

    assert fsdp["steps_run"] == single["steps_run"] == list(range(1, MAX_STEPS + 1))
    for step in range(1, MAX_STEPS + 1):
        assert fsdp["losses"][step] == pytest.approx(single["losses"][step], rel=1e-5), step
    assert fsdp["num_recomputes"] == single["num_recomputes"] == MAX_STEPS // INTERVAL
    assert sorted(fsdp["masks"]) == sorted(single["masks"]) == list(range(INTERVAL, MAX_STEPS + 1, INTERVAL))
    for step, masks in single["masks"].items():  # after every recompute, every expert (and Linear) mask
        assert fsdp["masks"][step].keys() == masks.keys() and any(".experts." in k for k in masks)
        for name, mask in masks.items():
            assert torch.equal(fsdp["masks"][step][name], mask), (step, name)
    assert fsdp["expert_flips_vs_initial"] == single["expert_flips_vs_initial"] > 0  # expert masks moved
    assert fsdp["flip_rate_vs_initial"] == single["flip_rate_vs_initial"]  # all-reduced flip counts
    assert fsdp["metrics"] == pytest.approx(single["metrics"], rel=1e-5)  # densities, norms: summed over ranks
    assert fsdp["weights"].keys() == single["weights"].keys()
    for name, w in single["weights"].items():
        got = fsdp["weights"][name]
        if name.endswith(".merged"):  # W ⊙ mask, elementwise: 1-4 entries per expert tensor differ by up to 8e-5
            # of max|W| (measured: entries with ~0 gradient, e.g. an expert's rarely used channels, whose
            # summation-order noise Adam's g/sqrt(v) amplifies); every other entry within 1e-5
            assert torch.allclose(got, w, rtol=1e-5, atol=2e-4 * float(w.abs().max())), name
        assert float((got - w).norm() / w.norm()) < 1e-5, name  # measured <= 4.2e-6 (experts), 3e-7 (Linear)


def test_fsdp2_moe_checkpoint_holds_the_all_reduced_routed_token_counts(fsdp_out, single_out):
    """The sums the next recompute scores with: per expert, over both ranks' tokens (not one rank's)."""
    sharded, single = (_ast_state(o / "out" / f"checkpoint-{SAVE_STEP}") for o in (fsdp_out, single_out))
    tokens = [k for k in single if k.endswith("#tokens")]
    assert sharded.keys() == single.keys() and len(tokens) == 4  # 2 layers x (gate_up_proj, down_proj)
    for name, value in single.items():
        assert float(value.sum()) > 0, name
        if name.endswith("#tokens"):  # routed tokens per expert: exact, both ranks' batches
            assert torch.equal(sharded[name], value), name
        else:  # Σx² per expert and input channel (measured: 2e-6 of the max, summation order)
            torch.testing.assert_close(sharded[name], value, rtol=1e-5, atol=1e-5 * float(value.abs().max()))
    assert float(single[tokens[0]].sum()) == 2 * 8 * 2 * 32  # GA 2 x 8 sequences x top-2 x 32 tokens


def test_fsdp2_moe_resume_from_sharded_checkpoint_equals_uninterrupted_run(tmp_path, base, fsdp_out):
    """The sharded checkpoint holds each rank's experts and expert masks (DCP); resumed on 2 fresh processes it
    continues exactly: the step-4 loss, the masks of the step-4 recompute and the final weights."""
    checkpoint = fsdp_out / "out" / f"checkpoint-{SAVE_STEP}"
    assert {"pytorch_model_fsdp_0", "optimizer_0", "ast_state.safetensors"} <= set(os.listdir(checkpoint))
    _launch(tmp_path, base, resume=str(checkpoint))
    resumed, uninterrupted = (torch.load(o / "result.pt") for o in (tmp_path, fsdp_out))
    assert resumed["steps_run"] == list(range(SAVE_STEP + 1, MAX_STEPS + 1))
    assert resumed["losses"][MAX_STEPS] == pytest.approx(uninterrupted["losses"][MAX_STEPS], rel=1e-6)
    assert sorted(resumed["masks"]) == [MAX_STEPS]
    for name, mask in uninterrupted["masks"][MAX_STEPS].items():
        assert torch.equal(resumed["masks"][MAX_STEPS][name], mask), name
    for name, w in uninterrupted["weights"].items():
        assert torch.allclose(resumed["weights"][name], w, rtol=1e-5, atol=1e-6), name


def test_fsdp2_moe_final_model_exports_and_reloads_like_the_single_process_one(tmp_path, fsdp_out, single_out):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import hf_sparse
    from hf_sparse.modules.packed_experts import PackedExpertWeight

    fsdp_sd = load_file(fsdp_out / "final" / "adapter_model.safetensors")
    single_sd = load_file(single_out / "final" / "adapter_model.safetensors")
    assert fsdp_sd.keys() == single_sd.keys()
    for key in ("layers.0.mlp.experts.base_layer.ast_mask", "layers.0.mlp.experts.ast_mask"):  # gate_up, down
        key = next(k for k in fsdp_sd if k.endswith(key))
        assert fsdp_sd[key].shape[0] == EXPERTS and torch.equal(fsdp_sd[key], single_sd[key])  # all experts
    for name, out in (("fsdp", fsdp_out), ("single", single_out)):
        hf_sparse.export(out / "final", tmp_path / name, hf_sparse.HfSparseConfig(values_dtype="float32"))
    got_model, want_model = (AutoModelForCausalLM.from_pretrained(tmp_path / n) for n in ("fsdp", "single"))
    qc = got_model.config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    assert len(qc["expert_targets"]) == 4  # 2 layers x (gate_up_proj, down_proj), packed N:M
    for name in qc["expert_targets"]:
        assert isinstance(got_model.get_submodule(name), PackedExpertWeight), name
    ids = torch.randint(0, got_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = got_model(ids).logits, want_model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_fsdp2_moe_refuses_experts_sharded_off_the_expert_index_or_as_their_own_unit(fsdp_out):
    """shard_placement_fn choosing Shard(1) for the expert weights (N:M groups would straddle ranks), and an experts
    module fully_shard-ed by itself (its weight would be sharded when the wrapper builds W ⊙ mask)."""
    for r in range(2):
        msg = json.loads((fsdp_out / f"rank{r}.json").read_text())["shard1_error"]
        assert "fused MoE expert parameter model.layers.0.mlp.experts." in msg and "Shard(dim=1)" in msg, msg
        assert "AST needs Shard(0) (whole experts per rank)" in msg, msg
        msg = json.loads((fsdp_out / f"rank{r}.json").read_text())["experts_unit_error"]
        assert "model.layers.0.mlp.experts." in msg and "is fully_shard-ed on its own" in msg, msg


# ---- the script ----
#: by hand: MOE_ARCH=gpt_oss runs the same tests on gpt-oss's transposed [E, in, out] experts
ARCH = os.environ.get("MOE_ARCH", "mixtral")
LAYER_CLS = {"mixtral": "MixtralDecoderLayer", "gpt_oss": "GptOssDecoderLayer"}[ARCH]


def _tiny_mixtral() -> torch.nn.Module:
    import transformers

    from conftest import VOCAB

    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                  num_key_value_heads=2, intermediate_size=32, num_local_experts=EXPERTS, num_experts_per_tok=2)
    if ARCH == "gpt_oss":
        config = transformers.GptOssConfig(head_dim=16, sliding_window=8,
                                           layer_types=["sliding_attention", "full_attention"], **common)
    else:
        config = transformers.MixtralConfig(**common)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t.clone()  # a copy: recomputes write masks in place


def _refusal(kind: str) -> str:
    """shard_ast_masks on a model whose expert weights were fully_shard-ed on dim 1 (``kind="shard1"``) or whose
    experts modules were fully_shard-ed on their own (``"experts_unit"``): the refusal's message."""
    from peft import get_peft_model
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from hf_sparse import ASTConfig
    from hf_sparse.training.callbacks import find_ast_model
    from hf_sparse.training.fsdp import shard_ast_masks

    model = get_peft_model(_tiny_mixtral(), ASTConfig(target_modules=[]))
    placement = lambda p: Shard(1) if p.dim() == 3 else Shard(0)  # noqa: E731
    for layer in model.base_model.model.model.layers:
        if kind == "experts_unit":
            fully_shard(layer.mlp.experts.get_base_layer())
        fully_shard(layer, shard_placement_fn=placement if kind == "shard1" else None)
    fully_shard(model)
    try:
        shard_ast_masks(find_ast_model(model)[0])
    except NotImplementedError as e:
        return str(e)
    return "not refused"


def _main(out: str, mode: str, base: str, resume: str = "") -> None:
    import shutil
    from test_training_utils import ast_args, hamlet_blocks
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM, TrainerCallback, default_data_collator

    from hf_sparse import ASTConfig, ASTTrainer
    from hf_sparse.training.callbacks import find_ast_model

    os.makedirs(out, exist_ok=True)
    if resume and int(os.environ.get("RANK", "0")) == 0:  # the checkpoint, copied into this run's output dir
        shutil.copytree(resume, os.path.join(out, "out", os.path.basename(resume)))
    config = ASTConfig(target_modules=["q_proj", "v_proj"], mask_update_interval=INTERVAL, masked_decay_peak=0.05,
                       masked_decay_ramp_steps=2, mask_score="activation", use_slorb=False)
    extra = {}
    if mode == "fsdp":
        extra = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": [LAYER_CLS]})
    args = ast_args(os.path.join(out, "out"), max_steps=MAX_STEPS, per_device_train_batch_size=8 if mode == "single"
                    else 4, gradient_accumulation_steps=2, logging_steps=1, ast_plot=False, learning_rate=5e-3,
                    save_strategy="steps", save_steps=SAVE_STEP, **extra)
    masks: dict[int, dict[str, torch.Tensor]] = {}
    steps_run: list[int] = []

    def all_masks(ast_model) -> dict[str, torch.Tensor]:
        layers = [*ast_model.ast_layers(), *ast_model.ast_expert_layers()]
        return {n.replace("._checkpoint_wrapped_module", ""): _full(l.ast_mask["default"]) for n, l in layers}

    class RecordMasks(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            step = state.global_step + 1
            steps_run.append(step)
            if trainer.ast_callback.recompute_due(step):  # the AST callback ran first: recomputed at this step
                masks[step] = all_masks(find_ast_model(trainer.model)[0])

    trainer = ASTTrainer(model=AutoModelForCausalLM.from_pretrained(base), args=args, ast_config=config,
                         train_dataset=hamlet_blocks(32, 64), data_collator=default_data_collator,
                         callbacks=[RecordMasks()])
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model(os.path.join(out, "final"))  # FSDP2: the full state dict, written once by rank 0
    ast_model, _ = find_ast_model(trainer.model)
    weights = {name: _full(p) for name, p in trainer.model.named_parameters()}
    for name, wrapper in ast_model.ast_expert_layers():
        weights[name + ".merged"] = _full(wrapper.get_param()) * _full(wrapper.ast_mask["default"])
    initial = {n: _full(w.ast_initial_mask["default"]) for n, w in ast_model.ast_expert_layers()}
    current = {n: _full(w.ast_mask["default"]) for n, w in ast_model.ast_expert_layers()}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    result = {
        "losses": {h["step"]: h["loss"] for h in logs},
        "steps_run": steps_run,
        "masks": masks,
        "num_recomputes": trainer.ast_callback.num_recomputes,
        "flip_rate_vs_initial": trainer.ast_callback.last_flip["ast/flip_rate_vs_initial"],
        "expert_flips_vs_initial": sum(int((current[n] != initial[n]).sum()) for n in current),
        "metrics": {k: v for k, v in logs[-1].items() if k.startswith("ast/") and "seconds" not in k},
        "weights": weights,
    }
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        torch.save(result, os.path.join(out, "result.pt"))
    if mode == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        wrappers = dict(ast_model.ast_expert_layers())
        gate_up = wrappers["model.layers.0.mlp.experts.gate_up_proj"]
        down = wrappers["model.layers.0.mlp.experts.down_proj"]
        param, mask = gate_up.get_param(), gate_up.ast_mask["default"]
        info = {
            "world_size": torch.distributed.get_world_size(),
            "fsdp_module": isinstance(trainer.model, FSDPModule),
            "ddp": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
            "expert_is_dtensor": isinstance(param, DTensor),
            "expert_mask_is_dtensor": isinstance(mask, DTensor),
            "placements": [str(p) for p in (*param.placements, *mask.placements)],
            "gate_up_shape": list(param.shape),
            "gate_up_local_shape": list(param.to_local().shape),
            "down_shape": list(down.get_param().shape),
            "down_local_shape": list(down.ast_mask["default"].to_local().shape),
            "shard1_error": _refusal("shard1"),
            "experts_unit_error": _refusal("experts_unit"),
        }
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(info, f)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("hf_sparse").setLevel(logging.INFO)
    _main(*sys.argv[1:])
