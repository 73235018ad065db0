"""``hf-sparse demo``: the main job, end to end on a model (interim: a tiny Llama built from a config).

Until the offline default assets land, the demo shows the adapter path a user takes:
dense model -> ``get_peft_model(ASTConfig())`` -> mask recompute -> ``merge_and_unload`` -> save ->
``from_pretrained`` -> identical logits and exact 2:4 weights.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="./hf-sparse-demo", help="where the 2:4 model and results go")
    parser.add_argument("--steps", type=int, default=20, help="training steps")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")


def run(args: argparse.Namespace) -> int:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    import hf_sparse

    start = time.time()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 256, (4, 32))
    peft_model = get_peft_model(model, hf_sparse.ASTConfig())
    opt = torch.optim.AdamW(peft_model.parameters(), lr=1e-3)
    steps = 3 if args.smoke else args.steps
    losses = []
    for step in range(steps):
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if (step + 1) % 10 == 0:
            peft_model.base_model.update_masks()
    merged = peft_model.merge_and_unload()
    os.makedirs(args.output_dir, exist_ok=True)
    model_dir = os.path.join(args.output_dir, "model")
    merged.save_pretrained(model_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    same = torch.equal(reloaded(ids).logits, merged(ids).logits)
    sparse = all(hf_sparse.is_nm_sparse(m.weight) for n, m in reloaded.named_modules() if n.endswith("_proj"))
    results = {"model_dir": model_dir, "losses": losses, "reload_identical": same, "all_2to4": sparse,
               "wall_time_s": round(time.time() - start, 2)}
    with open(os.path.join(args.output_dir, "results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; 2:4 everywhere: {sparse}; reload identical: {same}")
    return 0 if (same and sparse) else 1
