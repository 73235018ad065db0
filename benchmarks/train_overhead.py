"""Step-time overhead of AST over a plain fine-tune: one model, batch and machine, in one run.

Rows (same model, data, batch, precision, optimizer family):
  plain      transformers.Trainer, dense model, CE loss
  ast_no_kd  ASTTrainer with distill_alpha=0: STE masks, masked-decay AdamW, mask recomputes, no teacher
  ast_full   ASTTrainer: + frozen dense teacher (KL distillation)
Each repeat runs the three rows back to back; "x plain" is the median over repeats of the ratio within a repeat,
because step times on a shared machine drift by ±5-10% between minutes. Also reported: the share of AST's step
time spent recomputing masks (ASTMaskCallback's own timer, amortised over Δt).
Targets (issue 3): full AST <= 1.4x the plain step; mask recompute <= 2% of step time.

    python benchmarks/train_overhead.py                        # bundled SmolLM2-135M, 4 x 256 tokens, CPU
    python benchmarks/train_overhead.py --device cuda --batch-size 16 --seq-len 512

Writes ``--out`` (JSON) and prints a Markdown table. Timed steps exclude ``--warmup`` first steps.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_sparse import ASTConfig, ASTTrainer, ASTTrainingArguments  # noqa: E402
from hf_sparse.atomic import atomic_write_json as write_json_atomic  # noqa: E402
from hf_sparse.training.data import TextBlocks  # noqa: E402


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, optimizer, callbacks), synchronised on CUDA."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._t)


def load(model: str | None, device: str):
    if model == "tiny":
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2)
        return AutoModelForCausalLM.from_config(cfg).to(device), 4096
    from hf_sparse.assets import load_model_and_tokenizer

    m, tok = load_model_and_tokenizer(model, device=device)
    return m, len(tok)


def run_one(kind: str, base, data, args, bf16: bool) -> dict:
    """Train ``kind`` for warmup + steps; the timed step durations and the mask-recompute time."""
    common = dict(output_dir=os.path.join(args.work_dir, kind), per_device_train_batch_size=args.batch_size,
                  learning_rate=1e-5, max_steps=args.warmup + args.steps, logging_steps=10_000, save_strategy="no",
                  report_to=[], use_cpu=args.device == "cpu", seed=0, disable_tqdm=True, bf16=bf16,
                  optim="adamw_torch", lr_scheduler_type="constant")
    timer = StepTimer()
    model = copy.deepcopy(base)
    if kind == "plain":
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data,
                          data_collator=default_data_collator, callbacks=[timer])
    else:
        cfg = ASTConfig(mask_score=args.mask_score, mask_update_interval=args.interval, masked_decay_peak=1e-4,
                        masked_decay_ramp_steps=1)
        targs = ASTTrainingArguments(**common, distill_alpha=0.0 if kind == "ast_no_kd" else 0.67, ast_plot=False,
                                     teacher_dtype="bfloat16" if bf16 else None)
        trainer = ASTTrainer(model=model, args=targs, ast_config=cfg, train_dataset=data,
                             data_collator=default_data_collator, callbacks=[timer])
    trainer.train()
    run = {"times": timer.times[args.warmup:]}
    if kind != "plain":
        cb = trainer.ast_callback
        run["recomputes"], run["recompute_s"] = cb.num_recomputes, cb.recompute_seconds
    del trainer, model
    return run


def summarize(kind: str, runs: list[dict]) -> dict:
    """Median over the timed steps of every repeat of one kind (repeats interleave kinds: drift hits all alike)."""
    timed = [t for r in runs for t in r["times"]]
    row = {"kind": kind, "step_s_median": statistics.median(timed), "step_s_mean": statistics.fmean(timed),
           "steps_timed": len(timed), "repeats": len(runs)}
    if kind != "plain":
        recomputes = sum(r["recomputes"] for r in runs)
        row["recomputes"] = recomputes
        row["recompute_s_each"] = sum(r["recompute_s"] for r in runs) / max(recomputes, 1)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="hub id/dir; default the bundled SmolLM2-135M; `tiny` = random 4-layer")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="run the three rows this many times, interleaved")
    p.add_argument("--interval", type=int, default=10, help="mask recompute interval Δt")
    p.add_argument("--mask-score", default="activation", choices=["activation", "magnitude"])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work-dir", default="/tmp/hf_sparse_overhead")
    p.add_argument("--out", default="benchmarks/results/train_overhead.json")
    args = p.parse_args()
    from hf_sparse.demo import _use_bf16

    bf16 = _use_bf16(args.precision, args.device)
    base, vocab = load(args.model, args.device)
    g = torch.Generator().manual_seed(0)
    n = (args.warmup + args.steps) * args.batch_size
    data = TextBlocks(torch.randint(0, vocab, (n * args.seq_len,), generator=g), args.seq_len)
    kinds = ("plain", "ast_no_kd", "ast_full")
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            runs[kind].append(run_one(kind, base, data, args, bf16))
    rows = [summarize(kind, runs[kind]) for kind in kinds]
    for r in rows:  # ratio within each repeat (adjacent in time), then the median over repeats
        per_repeat = [statistics.median(a["times"]) / statistics.median(b["times"])
                      for a, b in zip(runs[r["kind"]], runs["plain"])]
        r["x_plain"] = statistics.median(per_repeat)
        r["x_plain_per_repeat"] = per_repeat
        if "recompute_s_each" in r:
            r["recompute_share"] = r["recompute_s_each"] / (args.interval * r["step_s_median"])
    doc = {"model": args.model or "SmolLM2-135M-Instruct (bundled)", "device": args.device,
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "bf16": bf16,
           "batch": f"{args.batch_size} x {args.seq_len}", "repeats": args.repeats, "interval": args.interval, "mask_score": args.mask_score,
           "rows": rows, "targets": {"ast_full_x_plain_max": 1.4, "recompute_share_max": 0.02}}
    write_json_atomic(doc, args.out)
    print(f"\n{doc['model']} on {args.device} ({doc['threads']} threads, bf16={bf16}), batch {doc['batch']}, "
          f"Δt={args.interval}, score={args.mask_score}")
    print("| run | step s (median) | x plain (median of repeats) | x plain per repeat | mask recompute s "
          "| recompute share of step time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rec = f"{r['recompute_s_each']:.3f}" if "recompute_s_each" in r else "-"
        share = f"{100 * r['recompute_share']:.2f}%" if "recompute_share" in r else "-"
        each = " / ".join(f"{x:.2f}" for x in r["x_plain_per_repeat"])
        print(f"| {r['kind']} | {r['step_s_median']:.3f} | {r['x_plain']:.2f} | {each} | {rec} | {share} |")
    full = rows[-1]
    print(f"targets: full AST {full['x_plain']:.2f}x plain (<= 1.4): {'met' if full['x_plain'] <= 1.4 else 'NOT met'}; "
          f"recompute {100 * full['recompute_share']:.2f}% (<= 2%): {'met' if full['recompute_share'] <= 0.02 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
