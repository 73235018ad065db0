"""Where an AST step's time goes, with plain / AST-without-teacher / full-AST steps interleaved round-robin.

``train_overhead.py`` times the real Trainers one after another; on a shared machine their speed drifts between
minutes. Here the three steps alternate inside one process, so drift hits all three alike, and each step is split
into phases (student forward, teacher forward, loss, backward, optimizer). The pieces are the library's own
(``prepare_ast_model``, ``frozen_teacher``, ``distillation_loss_sums``, ``MaskedDecayAdamW``); the Trainer's
bookkeeping, gradient clipping, activation-norm hooks and mask recomputes are left out (``train_overhead.py`` covers them).

    python benchmarks/train_step_breakdown.py                 # bundled SmolLM2-135M, 4 x 256, bf16 autocast
    python benchmarks/train_step_breakdown.py --model tiny --rounds 3

Writes ``--out`` (JSON) and prints a Markdown table of median phase times and the ratio to the plain step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_overhead import load  # noqa: E402

from hf_sparse import ASTConfig  # noqa: E402
from hf_sparse.atomic import atomic_write_json as write_json_atomic  # noqa: E402
from hf_sparse.training.distill import distillation_loss_sums  # noqa: E402
from hf_sparse.training.optim import MaskedDecayAdamW  # noqa: E402
from hf_sparse.training.trainer import frozen_teacher, prepare_ast_model  # noqa: E402

PHASES = ("forward", "teacher", "loss", "backward", "optimizer")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Clock:
    """Accumulates named phase durations of one step."""

    def __init__(self, device: str) -> None:
        self.device, self.phases, self._t = device, {}, 0.0

    def start(self) -> None:
        _sync(self.device)
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._t
        self._t = now


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="hub id/dir; default the bundled SmolLM2-135M; `tiny` = random 4-layer")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=8, help="timed rounds (one step of each kind per round)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.67)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results/train_step_breakdown.json")
    args = p.parse_args()
    from hf_sparse.demo import _use_bf16

    bf16 = _use_bf16(args.precision, args.device)
    autocast = (lambda: torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16)) if bf16 else nullcontext
    base, vocab = load(args.model, args.device)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(args.device)
               for _ in range(args.warmup + args.rounds)]

    plain = copy.deepcopy(base).train()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-5)
    teacher = frozen_teacher(base, torch.bfloat16 if bf16 else None)
    student = prepare_ast_model(copy.deepcopy(base), ASTConfig()).train()
    student_opt = MaskedDecayAdamW([q for q in student.parameters() if q.requires_grad], lr=1e-5, model=student)
    student_opt.set_masked_decay(1e-4)

    def plain_step(x: torch.Tensor, clock: Clock) -> None:
        with autocast():
            loss = plain(input_ids=x, labels=x).loss  # the model's own CE, as the plain Trainer computes it
        clock.lap("forward")
        loss.backward()
        clock.lap("backward")
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        clock.lap("optimizer")

    def ast_step(x: torch.Tensor, clock: Clock, with_teacher: bool) -> None:
        with autocast():
            logits = student(input_ids=x).logits
            clock.lap("forward")
            teacher_logits = None
            if with_teacher:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=x).logits
                clock.lap("teacher")
            parts = distillation_loss_sums(logits, x, teacher_logits, args.alpha if with_teacher else 0.0,
                                           args.temperature)
            loss = parts.total / parts.num_tokens
        clock.lap("loss")
        loss.backward()
        clock.lap("backward")
        student_opt.step()
        student_opt.zero_grad(set_to_none=True)
        clock.lap("optimizer")

    kinds = {"plain": plain_step, "ast_no_kd": lambda x, c: ast_step(x, c, False),
             "ast_full": lambda x, c: ast_step(x, c, True)}
    records: dict[str, list[dict]] = {k: [] for k in kinds}
    for i, x in enumerate(batches):
        for kind, step in kinds.items():
            clock = Clock(args.device)
            clock.start()
            step(x, clock)
            if i >= args.warmup:
                records[kind].append({**clock.phases, "step": sum(clock.phases.values())})

    plain_median = statistics.median(r["step"] for r in records["plain"])
    rows = []
    for kind, recs in records.items():
        row = {"kind": kind, "step_s_median": statistics.median(r["step"] for r in recs)}
        for phase in PHASES:
            row[f"{phase}_s_median"] = statistics.median(r.get(phase, 0.0) for r in recs)
        # ratio per round (steps adjacent in time), then the median
        row["x_plain"] = statistics.median(a["step"] / b["step"] for a, b in zip(recs, records["plain"]))
        rows.append(row)
    doc = {"model": args.model or "SmolLM2-135M-Instruct (bundled)", "device": args.device,
           "threads": torch.get_num_threads(), "bf16": bf16, "batch": f"{args.batch_size} x {args.seq_len}",
           "rounds": args.rounds, "alpha": args.alpha, "temperature": args.temperature, "rows": rows,
           "plain_step_s_median": plain_median}
    write_json_atomic(doc, args.out)
    print(f"\n{doc['model']} on {args.device} ({doc['threads']} threads, bf16={bf16}), batch {doc['batch']}, "
          f"{args.rounds} interleaved rounds; plain 'forward' includes its CE loss")
    print("| step | " + " | ".join(f"{ph} s" for ph in PHASES) + " | step s | x plain (median of rounds) |")
    print("|---" * (len(PHASES) + 3) + "|")
    for r in rows:
        cells = " | ".join(f"{r[f'{ph}_s_median']:.3f}" for ph in PHASES)
        print(f"| {r['kind']} | {cells} | {r['step_s_median']:.3f} | {r['x_plain']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
