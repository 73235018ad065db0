"""Quality at an equal token budget on SmolLM2-135M-Instruct: one-shot baselines vs sparse training.

Rows: dense; one-shot magnitude / Wanda / SparseGPT 2:4; fixed-mask sparse fine-tuning with distillation
(SparseGPT mask, never recomputed); AST (SparseGPT init, masks recomputed); AST + SLoRB (S starts at zero:
SparseGPT's weight update already compensates the pruned weights, and the paper's mean-of-pruned init on top
of it double-counts them: measured 4.4x vs 3.5x dense after 2 steps). The three trained
rows get the same data, steps, batch and learning rate (the demo's recipe: KL distillation from the dense
teacher on Shakespeare + the teacher's chat answers). Each trained row is evaluated on a slice of the eval
split every ``--curve-every`` steps (the ratio-vs-tokens curve) and on the full eval slice at the end.

Levers (``--methods``, beside the rows above): ``ast_progressive`` (``ASTConfig(schedule="progressive")``, CAST-style,
from the dense model), ``ast_lr_high`` (AST at ``--high-learning-rate``), ``ast_cosine`` (AST with a cosine LR
schedule). Every trained row gets the same ``--time-budget`` of training wall-clock (the step count follows from
its measured step time; curve evaluations are not counted) unless ``--max-steps`` fixes the steps. Every row is also
scored on the other domain (:func:`hf_sparse.assets.other_domain`, never trained on) when it is installed.

    python benchmarks/quality.py                       # CPU default: 10 min of training per trained row
    python benchmarks/quality.py --split validation    # tune here; report the held-out run
    python benchmarks/quality.py --max-steps 120       # a fixed step count instead of the time budget
    python benchmarks/quality.py --device cuda --max-steps 400 --batch-size 16   # ~10 min on one H100

Writes ``--out`` (JSON: rows, curves, settings) and a PNG beside it; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, default_data_collator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_sparse  # noqa: E402
from hf_sparse import ASTConfig, ASTTrainer, ASTTrainingArguments  # noqa: E402
from hf_sparse.atomic import atomic_write_json as write_json_atomic  # noqa: E402
from hf_sparse.assets import load_model_and_tokenizer, shakespeare  # noqa: E402
from hf_sparse.demo import (  # noqa: E402
    MIN_STEP_S, Budget, _use_bf16, ast_student, heldout_stream, other_domain_stream, training_dataset,
)
from hf_sparse.evaluation import (  # noqa: E402
    chat_accuracy, evaluate_lm, load_questions, reference_logprobs, teacher_chat_conversations,
)
from hf_sparse.oneshot import prune_oneshot  # noqa: E402
from hf_sparse.text import tokenize_texts  # noqa: E402
from hf_sparse.training.time_budget import TimeBudgetCallback, parse_duration  # noqa: E402


class CurveCallback(TrainerCallback):
    """Held-out perplexity on a small slice every ``every`` steps: the ratio-vs-tokens curve."""

    def __init__(self, ids: torch.Tensor, every: int, seq_len: int, tokens_per_step: int):
        self.ids, self.every, self.seq_len, self.tokens_per_step = ids, every, seq_len, tokens_per_step
        self.points: list[dict] = []
        self.eval_s = 0.0  # not training time: the time budget's clock leaves it out

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            t = time.perf_counter()
            ppl = evaluate_lm(model, self.ids, max_length=self.seq_len, stride=self.seq_len, progress=False)
            self.points.append({"step": state.global_step, "tokens": state.global_step * self.tokens_per_step,
                                "perplexity": ppl["perplexity"]})
            model.train()
            self.eval_s += time.perf_counter() - t


def measure(name, model, tok, eval_ids, reference, args, extra=None, other_ids=None) -> dict:
    t = time.time()
    lm = evaluate_lm(model, eval_ids, reference=reference, max_length=args.seq_len, stride=args.seq_len,
                     device=args.device)
    row = {"method": name, "perplexity": lm["perplexity"], "kl_to_dense": lm.get("kl", 0.0)}
    if other_ids is not None:
        row["other_perplexity"] = evaluate_lm(model, other_ids, max_length=args.seq_len, stride=args.seq_len,
                                              device=args.device, progress=False)["perplexity"]
    if not args.no_chat:
        chat = chat_accuracy(model, tok, questions=load_questions()[: args.chat_questions])
        row["chat_accuracy"] = chat["accuracy"]
    row["eval_s"] = time.time() - t
    row.update(extra or {})
    print(f"  {name}: ppl {row['perplexity']:.2f}  KL {row['kl_to_dense']:.3f}"
          + (f"  other-domain ppl {row['other_perplexity']:.2f}" if "other_perplexity" in row else "")
          + (f"  chat {row['chat_accuracy']:.0%}" if "chat_accuracy" in row else ""), flush=True)
    return row


def train(name, dense, pruned, masks, cfg: ASTConfig, dataset, curve_ids, args, use_bf16: bool,
          steps: int, learning_rate: float, lr_scheduler: str = "constant"):
    """One trained row: ``steps`` fixed (``--max-steps``), or an upper bound that the time budget lowers."""
    student = ast_student(dense, pruned, masks, cfg, pruned_init=args.pruned_init)
    curve = CurveCallback(curve_ids, args.curve_every, args.seq_len, args.batch_size * args.seq_len)
    callbacks = [curve]
    budget = None
    if args.budget_s is not None:
        budget = TimeBudgetCallback(args.budget_s, tokens_per_step=args.batch_size * args.seq_len,
                                    clock=lambda: time.perf_counter() - curve.eval_s)
        callbacks.append(budget)
    targs = ASTTrainingArguments(
        output_dir=str(Path(args.work_dir) / name.replace(" ", "_")), per_device_train_batch_size=args.batch_size,
        learning_rate=learning_rate, lr_scheduler_type=lr_scheduler, max_steps=steps,
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=args.device == "cpu", seed=args.seed,
        data_seed=args.seed, distill_alpha=1.0, distill_temperature=1.0, bf16=use_bf16,
        teacher_dtype="bfloat16" if use_bf16 else None, ast_plot=False, disable_tqdm=False,
    )
    t = time.time()
    trainer = ASTTrainer(model=student, args=targs, teacher_model=dense, train_dataset=dataset,
                         data_collator=default_data_collator, callbacks=callbacks)
    if budget is not None:
        budget.progress = next((c for c in trainer.callback_handler.callbacks if type(c).__name__ == "ProgressCallback"),
                               None)
    trainer.train()
    flips = [h["ast/flip_rate"] for h in trainer.state.log_history if "ast/flip_rate" in h]
    steps_run = trainer.state.global_step
    model = trainer.model.merge_and_unload()
    return model, {"train_s": time.time() - t - curve.eval_s, "curve": curve.points, "train_steps": steps_run,
                   "train_tokens": steps_run * args.batch_size * args.seq_len, "learning_rate": learning_rate,
                   "lr_scheduler": lr_scheduler, "step_s": budget.step_s if budget is not None else None,
                   "flip_rate_last": flips[-1] if flips else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--split", default="heldout", choices=["heldout", "validation"], help="evaluation split")
    p.add_argument("--time-budget", default="10m",
                   help="training wall-clock per trained row (seconds or e.g. '10m'); the step count follows from "
                        "the measured step time")
    p.add_argument("--max-steps", type=int, default=None, help="fix the steps of every trained row (no time budget)")
    p.add_argument("--high-learning-rate", type=float, default=2e-4, help="learning rate of the ast_lr_high row")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--curve-tokens", type=int, default=2048)
    p.add_argument("--curve-every", type=int, default=30)
    p.add_argument("--calibration-samples", type=int, default=16)
    p.add_argument("--chat-fraction", type=float, default=0.5)
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt,fixed,ast,ast_slorb")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--no-chat", action="store_true", help="skip the chat check")
    p.add_argument("--chat-questions", type=int, default=None, help="first N chat questions only (default: all)")
    p.add_argument("--start", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"],
                   help="one-shot result the trained rows start from (their initial mask)")
    p.add_argument("--pruned-init", default="oneshot", choices=["oneshot", "dense"],
                   help="pruned weights of the trained rows start as the one-shot model has them, or dense")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="/tmp/hf_sparse_quality")
    p.add_argument("--out", default="benchmarks/results/quality.json")
    args = p.parse_args()
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max-steps must be >= 1, got {args.max_steps}")
    args.budget_s = None if args.max_steps is not None else parse_duration(args.time_budget)
    methods = args.methods.split(",")
    known = {"magnitude", "wanda", "sparsegpt", "fixed", "ast", "ast_slorb", "ast_progressive", "ast_lr_high",
             "ast_cosine"}
    if set(methods) - known:
        p.error(f"--methods: unknown {sorted(set(methods) - known)}; choose from {sorted(known)}")
    start = time.time()
    torch.manual_seed(args.seed)

    dense, tok = load_model_and_tokenizer(args.model, device=args.device)
    for prm in dense.parameters():
        prm.requires_grad_(False)
    eval_texts = shakespeare(args.split)
    eval_ids = heldout_stream(tok, eval_texts, args.eval_tokens)
    curve_ids = heldout_stream(tok, [t[len(t) // 2:] for t in eval_texts], args.curve_tokens)  # other part of the plays
    reference = reference_logprobs(dense, eval_ids, max_length=args.seq_len, stride=args.seq_len, device=args.device)
    other_ids = other_domain_stream(tok, args.split, args.eval_tokens)
    train_texts = shakespeare("train")
    rows = [measure("dense", dense, tok, eval_ids, reference, args, other_ids=other_ids)]
    rows[0]["curve_slice_perplexity"] = evaluate_lm(dense, curve_ids, max_length=args.seq_len, stride=args.seq_len,
                                                    device=args.device, progress=False)["perplexity"]

    calib_ids = tokenize_texts(tok, train_texts[:2])
    calibration = calib_ids[: args.calibration_samples * args.seq_len].view(args.calibration_samples, args.seq_len)
    pruned: dict[str, tuple] = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        trained = {"fixed", "ast", "ast_slorb", "ast_progressive", "ast_lr_high", "ast_cosine"}
        if method not in methods and not (method == args.start and trained & set(methods)):
            continue
        t = time.time()
        model = copy.deepcopy(dense)
        masks = prune_oneshot(model, method, None if method == "magnitude" else calibration, device=args.device)
        prune_s = time.time() - t
        if method in methods:
            rows.append(measure(f"one-shot {method}", model, tok, eval_ids, reference, args, {"prune_s": prune_s},
                                other_ids))
        if method == args.start:
            pruned[method] = (model, masks)
        else:
            del model

    steps = args.max_steps
    if steps is None:  # an upper bound for the data; each row's time budget lowers it
        steps = max(4, math.ceil(args.budget_s / MIN_STEP_S.get(torch.device(args.device).type, 0.2)))
    budget = Budget(max_steps=steps, batch_size=args.batch_size, seq_len=args.seq_len,
                    chat_fraction=args.chat_fraction)
    dataset = training_dataset(tok, train_texts[2:], teacher_chat_conversations(tok), budget, args.seed)
    use_bf16 = _use_bf16(args.precision, args.device)
    teacher = copy.deepcopy(dense)  # the trainer may cast its teacher to bf16; `dense` stays the fp32 reference
    ast_cfg = dict(mask_score="activation", mask_update_interval=10, masked_decay_peak=1e-4)
    lr = args.learning_rate
    configs = {  # key: (row name, config, learning rate, LR schedule)
        "fixed": ("fixed-mask distill", ASTConfig(mask_update_interval=0, masked_decay_peak=0.0), lr, "constant"),
        "ast": ("AST", ASTConfig(**ast_cfg), lr, "constant"),
        "ast_slorb": ("AST + SLoRB", ASTConfig(**ast_cfg, use_slorb=True, slorb_init="zero"), lr, "constant"),
        "ast_progressive": ("AST progressive (CAST-style)",
                            ASTConfig(mask_score="magnitude", mask_update_interval=10, schedule="progressive"),
                            lr, "constant"),
        "ast_lr_high": (f"AST lr {args.high_learning_rate:g}", ASTConfig(**ast_cfg), args.high_learning_rate,
                        "constant"),
        "ast_cosine": ("AST cosine LR", ASTConfig(**ast_cfg), lr, "cosine"),
    }
    for key in configs:
        if key not in methods:
            continue
        name, cfg, row_lr, schedule = configs[key]
        plan = f"{args.max_steps} steps" if args.max_steps else f"{args.budget_s:.0f} s"
        print(f"training {name} ({plan} x {args.batch_size} x {args.seq_len} tokens) ...", flush=True)
        model, extra = train(name, teacher, *pruned[args.start], cfg, dataset, curve_ids, args, use_bf16,
                             steps, row_lr, schedule)
        rows.append(measure(name, model.float(), tok, eval_ids, reference, args, extra, other_ids))
        del model

    dense_ppl = rows[0]["perplexity"]
    for r in rows:
        r["ratio_to_dense"] = r["perplexity"] / dense_ppl
        if "other_perplexity" in r:
            r["other_ratio_to_dense"] = r["other_perplexity"] / rows[0]["other_perplexity"]
    doc = {"model": args.model or "SmolLM2-135M-Instruct (bundled GGUF)", "split": args.split,
           "settings": {k: v for k, v in vars(args).items()}, "bf16": use_bf16, "rows": rows,
           "wall_s": time.time() - start, "torch": torch.__version__, "hf_sparse": hf_sparse.__version__}
    out = write_json_atomic(doc, args.out)
    write_plot(rows, out.with_suffix(".png"))

    plan = f"{args.max_steps} steps" if args.max_steps else f"{args.budget_s:.0f} s of training each"
    print(f"\n{args.split} perplexity, {args.eval_tokens} tokens; trained rows: {plan}, batch {args.batch_size} x "
          f"{args.seq_len} tokens; other domain: {'King James Bible' if other_ids is not None else 'not installed'}")
    print("| method | ppl | x dense | KL to dense | other-domain ppl | x dense | chat | train steps | train tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        chat = f"{r['chat_accuracy']:.0%}" if "chat_accuracy" in r else "-"
        other = (f"{r['other_perplexity']:.2f} | {r['other_ratio_to_dense']:.2f}" if "other_perplexity" in r
                 else "- | -")
        print(f"| {r['method']} | {r['perplexity']:.2f} | {r['ratio_to_dense']:.2f} | {r['kl_to_dense']:.3f} | "
              f"{other} | {chat} | {r.get('train_steps', 0)} | {r.get('train_tokens', 0):,} |")
    curve_dense = rows[0]["curve_slice_perplexity"]
    for r in rows:
        if r.get("curve"):
            print(f"curve {r['method']} (x dense on the curve slice, {curve_dense:.2f}): " + ", ".join(
                f"{c['tokens']:,} tok -> {c['perplexity'] / curve_dense:.2f}x" for c in r["curve"]))
    print(f"wall {doc['wall_s'] / 60:.1f} min; wrote {out}")
    return 0


def write_plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    dense = rows[0]["perplexity"]
    curve_dense = rows[0].get("curve_slice_perplexity", dense)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    axes[0].barh([r["method"] for r in rows], [r["perplexity"] / dense for r in rows])
    axes[0].set_xscale("log")
    axes[0].axvline(1.25, color="k", ls="--", lw=1, label="1.25x dense")
    axes[0].set_xlabel("perplexity / dense")
    axes[0].legend()
    for r in rows:
        if r.get("curve"):
            axes[1].plot([c["tokens"] for c in r["curve"]], [c["perplexity"] / curve_dense for c in r["curve"]],
                         marker="o", label=r["method"])
    axes[1].axhline(1.25, color="k", ls="--", lw=1)
    axes[1].set_xlabel("training tokens")
    axes[1].set_ylabel("perplexity / dense (curve slice)")
    axes[1].legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
