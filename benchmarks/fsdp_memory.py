"""Per-rank memory of AST training under FSDP2 (CPU, gloo) against one process: what sharding actually saves.

For world sizes 1 (one process, no FSDP: the baseline), 2 and 4 (``accelerate launch``, ASTTrainer with
``fsdp=True, fsdp_config={"version": 2, ...}``; 4 processes run oversubscribed on a 2-core machine, gloo does not
care), a ~100M-parameter Llama config trains a few optimizer steps with the paper's setup (masked-decay AdamW,
activation-score mask recompute, SLoRB, a frozen dense teacher). Measured on every rank right after the last
optimizer step, before gradients are zeroed:

- bytes of the student's parameters, gradients, optimizer state (Adam moments and step) and AST masks (current +
  initial) that this rank holds (local shards of the DTensors), their sum ("sharded state"), and the teacher's
  parameters;
- peak RSS of the process (``ru_maxrss``), the RSS after the step, and after the step once ``gc.collect()`` and
  glibc's ``malloc_trim`` handed freed heap back (what is really live), plus the RSS right after the imports
  (torch, transformers: the same in every process, not training state).

Ratios are to world size 1, taking the largest rank. Goals (issue 12): sharded state <= 0.55x at 2 ranks,
<= 0.30x at 4. Peak RSS is not expected to shrink as much on CPU: every rank builds the whole model (and copies
the teacher from it) before ``fully_shard`` (accelerate's rank-0 ``cpu_ram_efficient_loading`` is off: AST's masks
are buffers it does not broadcast), and glibc keeps freed heap.

    python benchmarks/fsdp_memory.py                    # world sizes 1 2 4, 2 steps, writes the JSON below
    python benchmarks/fsdp_memory.py --world-sizes 1 2 --steps 3

Writes ``--out`` (JSON) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ~98M parameters: 12 x 7.08M decoder layers + a tied 16384 x 768 embedding
MODEL = dict(vocab_size=16384, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=12, max_position_embeddings=512, tie_word_embeddings=True)
GOALS = {2: 0.55, 4: 0.30}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _bytes(t) -> int:
    from hf_sparse.training.fsdp import local

    t = local(t)
    return t.numel() * t.element_size()


def worker(out: str, steps: int, seq_len: int) -> None:
    """One rank: train ``steps`` optimizer steps, then write this rank's bytes and RSS to ``out/rank<r>.json``."""
    import torch
    import transformers
    from transformers import TrainerCallback, default_data_collator

    from hf_sparse import ASTConfig, ASTTrainer, ASTTrainingArguments
    from hf_sparse.training.callbacks import find_ast_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rss_at_start = _rss_bytes()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**MODEL))
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, MODEL["vocab_size"], (64, seq_len),
                                                                        generator=g)]
    extra = {}
    if world > 1:
        extra = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    args = ASTTrainingArguments(output_dir=os.path.join(out, "run"), per_device_train_batch_size=1, max_steps=steps,
                                learning_rate=1e-4, save_strategy="no", report_to=[], use_cpu=True,
                                disable_tqdm=True, logging_steps=1, ast_plot=False, seed=0, **extra)
    config = ASTConfig(mask_update_interval=1, mask_score="activation", use_slorb=True)
    measured: dict = {}

    class Measure(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step + 1 < steps:
                return
            inner = trainer.model
            ast_model, _ = find_ast_model(inner)
            params = list(inner.parameters())
            opt_state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
            masks = [store[a] for _, layer in ast_model.ast_layers()
                     for store in (layer.ast_mask, layer.ast_initial_mask) for a in store]
            measured.update(
                params=sum(_bytes(p) for p in params),
                grads=sum(_bytes(p.grad) for p in params if p.grad is not None),
                optimizer=sum(_bytes(t) for t in opt_state),
                masks=sum(_bytes(m) for m in masks),
                teacher=sum(_bytes(p) for p in trainer.teacher_model.parameters()),
                rss_after_step=_rss_bytes(),
            )
            import gc

            from hf_sparse.kernels.cpu import release_freed_memory

            gc.collect()
            release_freed_memory()
            measured["rss_trimmed"] = _rss_bytes()

    trainer = ASTTrainer(model=model, args=args, ast_config=config, train_dataset=data,
                         data_collator=default_data_collator, callbacks=[Measure()])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    from torch.distributed.fsdp import FSDPModule

    rank = int(os.environ.get("RANK", "0"))
    measured.update(
        rank=rank, world_size=world, num_parameters=n_params, train_seconds=seconds, rss_at_start=rss_at_start,
        fsdp2=isinstance(trainer.model, FSDPModule),
        state=measured["params"] + measured["grads"] + measured["optimizer"] + measured["masks"],
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(measured, f)


def run_world(world: int, steps: int, seq_len: int, timeout: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory(prefix=f"fsdp-memory-{world}-") as out:
        worker_args = [__file__, "--worker", out, "--steps", str(steps), "--seq-len", str(seq_len)]
        if world == 1:
            cmd = [sys.executable, *worker_args]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(world),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *worker_args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"world size {world} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    if world > 1 and not all(r["fsdp2"] for r in ranks):
        raise SystemExit(f"world size {world}: the model was not an FSDPModule (not FSDP2)")
    return ranks


KEYS = ("params", "grads", "optimizer", "masks", "state", "teacher", "peak_rss", "rss_after_step", "rss_trimmed",
        "rss_at_start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps (the last one is measured)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per world size")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fsdp_memory.json")
    parser.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.seq_len)
        return
    if 1 not in args.world_sizes:
        raise SystemExit("--world-sizes must include 1 (the baseline the ratios are taken to)")
    rows = {}
    for world in sorted(args.world_sizes):
        ranks = run_world(world, args.steps, args.seq_len, args.timeout)
        rows[world] = {"max_rank": {k: max(r[k] for r in ranks) for k in KEYS}, "ranks": ranks}
        print(f"world size {world}: done in {max(r['train_seconds'] for r in ranks):.0f} s", file=sys.stderr)
    base = rows[1]["max_rank"]
    for world, row in rows.items():
        row["ratio_to_world_1"] = {k: row["max_rank"][k] / base[k] for k in KEYS}
        if world in GOALS:
            row["goal_state_ratio"] = GOALS[world]
            row["meets_goal"] = row["ratio_to_world_1"]["state"] <= GOALS[world]
    import torch

    result = {
        "benchmark": "fsdp_memory", "model": MODEL, "num_parameters": rows[1]["ranks"][0]["num_parameters"],
        "steps": args.steps, "seq_len": args.seq_len, "per_device_batch": 1, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "world_sizes": {str(w): r for w, r in rows.items()},
    }
    from hf_sparse.atomic import atomic_write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result, args.out)
    mb = 1024**2
    print(f"\n{result['num_parameters'] / 1e6:.1f}M-parameter Llama, AST (masked-decay AdamW, SLoRB, teacher), "
          f"FSDP2 over gloo; largest rank, MiB (ratio to world size 1)\n")
    print("| world | params | grads | optimizer | masks | **sharded state** | teacher | peak RSS | RSS after step "
          "| RSS after step, trimmed | RSS after imports |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for world, row in rows.items():
        cells = [f"{row['max_rank'][k] / mb:,.0f} ({row['ratio_to_world_1'][k]:.2f}x)" for k in KEYS]
        cells[4] = f"**{cells[4]}**"
        print(f"| {world} | " + " | ".join(cells) + " |")
    for world, row in rows.items():
        if world in GOALS:
            print(f"\nworld {world}: sharded state {row['ratio_to_world_1']['state']:.3f}x (goal <= {GOALS[world]}): "
                  f"{'met' if row['meets_goal'] else 'NOT met'}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
