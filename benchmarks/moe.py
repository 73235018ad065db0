"""MoE end to end on real weights, offline: sparse-upcycle SmolLM2-135M into a Mixtral-style MoE, prune it one-shot
(experts per routed expert), train it with AST (experts included), export packed 2:4 and reload it.

Upcycling (Komatsuzaki et al. 2022): each dense MLP is copied into E identical experts and a top-k router with
renormalised weights is added, so the upcycled model computes exactly what the dense one does (checked). The
experts then diverge: one-shot statistics and AST masks are per expert, from the tokens each expert receives.

Rows: dense, upcycled (must equal dense), one-shot (Wanda or SparseGPT: linears layer by layer, experts from their
routed calibration tokens), AST (a few steps, distilled from the dense model, measured on the reloaded export).
Each row: held-out perplexity (Shakespeare plays never trained on), KL to dense, chat check; then file sizes.

    python benchmarks/moe.py                       # CPU: 21 min on 2 loaded cores (RESULTS.md); --smoke: ~15 min
    python benchmarks/moe.py --experts 4 --top-k 2 --oneshot sparsegpt --max-steps 64 --seq-len 256   # a real budget

Prints a table and writes benchmarks/results/moe.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "moe.json"


def upcycle(dense, experts: int, top_k: int, seed: int = 0):
    """A MixtralForCausalLM whose E experts are copies of each dense MLP; the router is small and random."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = dense.config
    config = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None),
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=getattr(c, "rope_parameters", None), tie_word_embeddings=c.tie_word_embeddings,
        num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=None, router_jitter_noise=0.0,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=getattr(c, "pad_token_id", None),
    )
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(config).eval()
    state = {}
    for key, value in dense.state_dict().items():
        if ".mlp." not in key:
            state[key] = value
    for i, layer in enumerate(dense.model.layers):
        mlp = layer.mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(experts, 1, 1)
        state[f"model.layers.{i}.mlp.experts.down_proj"] = mlp.down_proj.weight.unsqueeze(0).repeat(experts, 1, 1)
        state[f"model.layers.{i}.mlp.gate.weight"] = torch.randn(experts, c.hidden_size) * 0.02
    missing, unexpected = moe.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not c.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"upcycle: missing {missing[:4]}, unexpected {unexpected[:4]}")
    moe.tie_weights()
    moe.set_experts_implementation("eager")  # per-expert F.linear: no [tokens, out, in] weight gathers on CPU
    return moe


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--oneshot", choices=["wanda", "sparsegpt"], default="wanda")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--chat-questions", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--output-dir", default="moe-bench")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.max_steps, args.batch_size, args.seq_len, args.eval_tokens = 2, 2, 64, 256
        args.calibration_samples, args.chat_questions = 2, 3
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, default_data_collator

    import hf_sparse
    from hf_sparse import ASTConfig, ASTTrainer, ASTTrainingArguments
    from hf_sparse.assets import load_model_and_tokenizer, shakespeare
    from hf_sparse.demo import Budget, heldout_stream, measure, training_dataset
    from hf_sparse.evaluation import reference_logprobs, teacher_chat_conversations
    from hf_sparse.oneshot import prune_experts_oneshot, prune_oneshot
    from hf_sparse.sparsity.experts import default_expert_parameters
    from hf_sparse.text import tokenize_texts

    start = time.time()
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(max_steps=args.max_steps, batch_size=args.batch_size, seq_len=args.seq_len,
                    eval_tokens=args.eval_tokens, calibration_samples=args.calibration_samples,
                    chat_questions=args.chat_questions)
    dense, tokenizer = load_model_and_tokenizer(None, device="cpu")
    for p in dense.parameters():
        p.requires_grad_(False)
    train_texts = shakespeare("train")
    eval_ids = heldout_stream(tokenizer, shakespeare("heldout"), budget.eval_tokens)
    reference = reference_logprobs(dense, eval_ids, max_length=budget.seq_len, stride=budget.seq_len, device="cpu")
    rows, timings = [], {}

    def row(name, model, **extra):
        t = time.time()
        r = measure(name, model, tokenizer, eval_ids, reference, budget, "cpu") | extra
        timings[f"eval {name}"] = time.time() - t
        rows.append(r)
        return r

    row("dense", dense)
    t = time.time()
    moe = upcycle(dense, args.experts, args.top_k)
    with torch.no_grad():
        probe = eval_ids[:128].unsqueeze(0)
        upcycle_err = float((moe(probe).logits - dense(probe).logits).abs().max())
    timings["upcycle"] = time.time() - t
    n_params = sum(p.numel() for p in moe.parameters())
    n_expert = sum(moe.get_parameter(n).numel() for n in default_expert_parameters(moe))
    print(f"upcycled: {n_params / 1e6:.1f}M parameters, {n_expert / 1e6:.1f}M in experts "
          f"({100 * n_expert / n_params:.1f}%); max |logit - dense| = {upcycle_err:.2e}", flush=True)
    # the upcycled model computes the dense logits (checked above): perplexity and KL only, its chat check is dense's
    from hf_sparse.evaluation import evaluate_lm

    t = time.time()
    lm = evaluate_lm(moe, eval_ids, reference=reference, max_length=budget.seq_len, stride=budget.seq_len)
    timings["eval upcycled"] = time.time() - t
    rows.append({"model": f"upcycled {args.experts}x top-{args.top_k}", "perplexity": lm["perplexity"],
                 "kl_to_dense": lm.get("kl", 0.0), "chat_accuracy": rows[0]["chat_accuracy"],
                 "chat_answered": rows[0]["chat_answered"], "chat_note": "= dense (same logits)",
                 "max_abs_logit_diff_to_dense": upcycle_err})

    t = time.time()
    calib_ids = tokenize_texts(tokenizer, train_texts[:2])
    n_cal = budget.calibration_samples * budget.seq_len
    calibration = calib_ids[:n_cal].view(budget.calibration_samples, budget.seq_len)
    pruned = copy.deepcopy(moe)
    masks = prune_oneshot(pruned, args.oneshot, calibration, progress=False)  # attention (routers stay dense)
    prune_experts_oneshot(pruned, args.oneshot, calibration, batch_size=4)  # experts, per routed expert
    timings["one-shot"] = time.time() - t
    row(f"one-shot {args.oneshot}", pruned)

    t = time.time()
    chat = teacher_chat_conversations(tokenizer)
    dataset = training_dataset(tokenizer, train_texts[2:], chat, budget, seed=0)
    config = ASTConfig(mask_score="activation", mask_update_interval=8, masked_decay_peak=1e-4)
    student = get_peft_model(pruned, config)  # expert masks = magnitude of the one-shot zeros = the one-shot masks
    from hf_sparse.training import set_ast_masks

    set_ast_masks(student, masks, source="one-shot")
    training_args = ASTTrainingArguments(
        output_dir=str(out / "ast_run"), per_device_train_batch_size=budget.batch_size,
        learning_rate=args.learning_rate, max_steps=budget.max_steps, logging_steps=max(1, budget.max_steps // 6),
        save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0, distill_alpha=1.0,
        distill_temperature=1.0, dataloader_num_workers=0, ast_plot=False,
    )
    trainer = ASTTrainer(model=student, args=training_args, teacher_model=dense, train_dataset=dataset,
                         data_collator=default_data_collator)
    trainer.train()
    timings["AST training"] = time.time() - t
    steps = trainer.state.global_step

    sizes = {}
    dense_dir = out / "upcycled-dense"
    copy.deepcopy(moe).half().save_pretrained(dense_dir)
    sizes["upcycled dense fp16"] = dir_mb(dense_dir)
    for bits in (16, 4):
        d = out / f"ast-2of4-{'fp16' if bits == 16 else 'int4'}"
        hf_sparse.export(trainer.model, d, bits=bits, group_size=128 if bits < 16 else None, overwrite=True)
        sizes[f"2:4 {'fp16' if bits == 16 else 'int4 g128'}"] = dir_mb(d)
    reloaded = AutoModelForCausalLM.from_pretrained(out / "ast-2of4-fp16").eval()
    reloaded.set_experts_implementation("eager")
    nm_ok = all(
        hf_sparse.is_nm_sparse(reloaded.get_submodule(n).dequantized(), 2, 4, dim=2)
        for n in reloaded.config.quantization_config.expert_targets
    )
    row("AST (reloaded 2:4 fp16 export)", reloaded, train_steps=steps,
        train_tokens=steps * budget.batch_size * budget.seq_len, experts_exact_2of4=nm_ok)

    doc = {"experts": args.experts, "top_k": args.top_k, "oneshot": args.oneshot, "budget": vars(budget),
           "parameters_m": n_params / 1e6, "expert_parameters_m": n_expert / 1e6, "rows": rows, "sizes_mb": sizes,
           "timings_s": timings, "wall_time_s": time.time() - start, "smoke": args.smoke,
           "cpu": "AMD EPYC, 2 cores, AVX512-BF16, shared/loaded", "precision": "fp32"}
    if not args.smoke:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        from hf_sparse.atomic import atomic_write_json

        atomic_write_json(doc, RESULTS)
    dense_ppl = rows[0]["perplexity"]
    print("\n| model | held-out ppl | x dense | KL to dense | chat check | answered |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['perplexity']:.2f} | {r['perplexity'] / dense_ppl:.2f} | {r['kl_to_dense']:.3f} "
              f"| {r['chat_accuracy']:.0%} | {r['chat_answered']:.0%} |")
    print("\n| checkpoint | MB |\n|---|---|")
    for k, v in sizes.items():
        print(f"| {k} | {v:.1f} |")
    print(f"\nexperts exactly 2:4 after reload: {nm_ok}; AST {steps} steps; total {doc['wall_time_s'] / 60:.1f} min; "
          + json.dumps({k: round(v) for k, v in timings.items()}))
    return 0 if nm_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
