"""CPU inference of exports vs the dense model: peak RSS after load, batch-1 greedy decode tokens/s, 512-token prefill.

    python benchmarks/cpu_inference.py                 # bundled SmolLM2-135M + a ~1B Llama-shaped random model
    python benchmarks/cpu_inference.py --models smollm2 --repeats 3

Each (model, variant) runs in its own process (so peak RSS is that variant's alone), the repeats interleaved over the
variants; the table reports medians and ratios to dense fp32 of the same run, and JSON goes to
``benchmarks/results/cpu_inference.json``. Variants: dense fp32, dense bf16, and 2:4 exports fp16, bf16, int8
(per channel), int4 (RTN; group 128 where the input widths allow, else 64: SmolLM2's 576 = 9 x 64). Exports store the
dense rest (embeddings, norms, lm_head) in bf16. The CPU paths are chosen by the dispatch's own measurement
(``HF_SPARSE_CPU_KERNELS``, on by default); the chosen path per layer kind is recorded. Weights of the 1B model are
random (speed and memory do not depend on their values); SmolLM2's are the real ones, pruned one-shot by magnitude.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "cpu_inference.json"
VARIANTS = ["dense-fp32", "dense-bf16", "2:4-fp16", "2:4-bf16", "2:4-int8", "2:4-int4"]


def cpu_description() -> str:
    from hf_sparse.kernels.autotune import device_name

    return device_name("cpu")


def build(model_name: str, work: Path, variants: list[str] = VARIANTS, reuse: bool = False) -> dict[str, str]:
    """Write the dense model and the exports of ``variants`` under ``work``; returns variant -> directory.
    ``reuse``: keep what an earlier run with the same ``work`` wrote (a directory with a config.json)."""
    import hf_sparse
    from transformers import AutoModelForCausalLM, LlamaConfig

    dense_dir = work / model_name / "dense"
    plan_dirs = {v: (dense_dir if v.startswith("dense") else work / model_name / v.replace(":", "of")) for v in variants}
    if reuse and all((d / "config.json").exists() for d in plan_dirs.values()):
        return {v: str(d) for v, d in plan_dirs.items()}
    if model_name == "smollm2":
        from hf_sparse import assets

        model = AutoModelForCausalLM.from_pretrained(assets.default_model_dir(), dtype=torch.float32)
        group = 64
    else:  # ~1.1B parameters, Llama-shaped (TinyLlama-1.1B dimensions), random weights
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                          num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        group = 128
    model.save_pretrained(dense_dir)
    hf_sparse.prune_oneshot(model, "magnitude", progress=False)
    dirs = {"dense-fp32": str(dense_dir), "dense-bf16": str(dense_dir)}
    plans = {
        "2:4-fp16": dict(quantization_config=hf_sparse.HfSparseConfig(bits=16, values_dtype="float16"),
                         dtype=torch.bfloat16),
        "2:4-bf16": dict(bits=16, dtype=torch.bfloat16),
        "2:4-int8": dict(bits=8, group_size=None, dtype=torch.bfloat16),
        "2:4-int4": dict(bits=4, group_size=group, dtype=torch.bfloat16),
    }
    for name, kw in plans.items():
        if name not in variants:
            continue
        out = work / model_name / name.replace(":", "of")
        hf_sparse.export(model, out, overwrite=True, **kw)
        dirs[name] = str(out)
    return dirs


def measure(directory: str, variant: str, prompt_len: int, new_tokens: int) -> dict:
    """In this process: load, warm up, time prefill and decode, read peak RSS."""
    import hf_sparse  # noqa: F401  (registers the loader)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if variant == "dense-bf16" else None
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(directory, **({"dtype": dtype} if dtype else {})).eval()
    load_s = time.perf_counter() - t0
    after_load = _rss_parts_mb()
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len))
    short = prompt[:, :16]
    with torch.no_grad():
        model(short)  # first use: the dispatch measures and converts once per shape (not timed)
        model(prompt)
        model.generate(short, max_new_tokens=2, do_sample=False, min_new_tokens=2)
        t = time.perf_counter()
        model(prompt)
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(short, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        decode_s = time.perf_counter() - t
    paths = {}
    from hf_sparse.modules import PackedNMLinear

    for name, module in model.named_modules():
        if isinstance(module, PackedNMLinear):
            kind = name.rsplit(".", 1)[-1]
            memo = module.__dict__.get("_dispatch_memo", {})
            paths.setdefault(kind, sorted({f"m{k[3]}:{v}" for k, v in memo.items()}))
    peak_mb = _peak_rss_mb()
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_tok_s": new_tokens / decode_s, "peak_rss_mb": peak_mb,
            "paths": paths, "rss_after_load": after_load, "rss_at_end": _rss_parts_mb(), "held": _held_mb(model)}


def _rss_parts_mb() -> dict[str, float]:
    """Resident memory now, split: RssAnon (heap: tensors, kernel layouts) and RssFile (mmap'd safetensors pages,
    shared libraries); VmHWM, the peak, is their sum at the worst moment."""
    parts = {}
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                parts[key] = int(line.split()[1]) / 1024
    return parts


def _held_mb(model) -> dict[str, float]:
    """What the loaded model holds, by kind: packed tensors as stored, kernel layouts/caches, other parameters."""
    from hf_sparse.modules import PackedNMLinear

    held = {"packed": 0.0, "kernel_cache": 0.0, "dense_rest": 0.0}
    seen = set()
    for module in model.modules():
        for name, t in list(module.named_buffers(recurse=False)) + list(module.named_parameters(recurse=False)):
            if t is None or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            mb = t.numel() * t.element_size() / 1e6
            if isinstance(module, PackedNMLinear) and name.startswith("_kernel_cache_"):
                held["kernel_cache"] += mb
            elif isinstance(module, PackedNMLinear) and name.startswith("nm_"):
                held["packed"] += mb
            else:
                held["dense_rest"] += mb
    return held


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: reset at exec, unlike ru_maxrss, which keeps the parent's peak)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(directory: str, variant: str, prompt_len: int, new_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--child", directory, variant, str(prompt_len), str(new_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,llama-1b", help="comma list: smollm2, llama-1b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--work-dir", default=None, help="where the dense models and exports are written (temp)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma list (dense-fp32, the ratios' base, is always run): {','.join(VARIANTS)}")
    parser.add_argument("--reuse", action="store_true", help="reuse the models --work-dir holds from an earlier run")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--fresh-autotune", action="store_true",
                        help="measure the CPU paths anew (a private autotune cache for this run)")
    args = parser.parse_args()
    if args.child:
        directory, variant, prompt_len, new_tokens = args.child
        print(json.dumps(measure(directory, variant, int(prompt_len), int(new_tokens))))
        return 0
    from tqdm.auto import tqdm

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="hf-sparse-cpu-bench-"))
    if args.fresh_autotune:
        os.environ["HF_SPARSE_CACHE_DIR"] = str(work / "autotune")
        (work / "autotune" / "autotune.json").unlink(missing_ok=True)  # also with --reuse: measured anew
    doc = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "repeats": args.repeats, "models": {}}
    variants = ["dense-fp32"] + [v for v in args.variants.split(",") if v and v != "dense-fp32"]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"argument --variants: unknown {unknown}; choose from {VARIANTS}")
    doc["variants"] = variants
    for model_name in args.models.split(","):
        print(f"building {model_name} and its exports in {work} ...", flush=True)
        dirs = build(model_name, work, variants, reuse=args.reuse)
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in tqdm(range(args.repeats), desc=f"{model_name} repeats"):
            for variant in variants:  # interleaved: drift in machine load hits every variant alike
                runs[variant].append(run_child(dirs[variant], variant, args.prompt_len, args.new_tokens))
        rows = {}
        for variant, samples in runs.items():
            med = {k: statistics.median(s[k] for s in samples) for k in ("peak_rss_mb", "decode_tok_s", "prefill_s", "load_s")}
            med["paths"] = samples[-1]["paths"]
            for key in ("rss_after_load", "rss_at_end", "held"):
                med[key] = samples[-1][key]
            med["disk_mb"] = sum(p.stat().st_size for p in Path(dirs[variant]).glob("*.safetensors")) / 1e6
            rows[variant] = med
        base = rows["dense-fp32"]
        for row in rows.values():
            row["rss_x"] = row["peak_rss_mb"] / base["peak_rss_mb"]
            row["decode_x"] = row["decode_tok_s"] / base["decode_tok_s"]
            row["prefill_x"] = base["prefill_s"] / row["prefill_s"]
        doc["models"][model_name] = rows
        print(f"\n{model_name} on {doc['cpu']} (medians of {args.repeats}; x = ratio to dense fp32, higher is better "
              "for decode/prefill, lower for RSS)")
        print("| variant | disk MB | peak RSS MB | RSS x | decode tok/s | decode x | prefill s | prefill x |")
        print("|---|---|---|---|---|---|---|---|")
        for variant, r in rows.items():
            print(f"| {variant} | {r['disk_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['rss_x']:.2f} | {r['decode_tok_s']:.1f} | "
                  f"{r['decode_x']:.2f} | {r['prefill_s']:.2f} | {r['prefill_x']:.2f} |")
        for variant in variants:
            r = rows[variant]
            if r["paths"]:
                print(f"{variant} paths chosen (layer kind: M bucket -> path):", json.dumps(r["paths"]))
            print(f"{variant} memory MB: after load {json.dumps(r['rss_after_load'])}, at end {json.dumps(r['rss_at_end'])}, "
                  f"held {json.dumps({k: round(v) for k, v in r['held'].items()})}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    from hf_sparse.atomic import atomic_write_json

    if RESULTS.exists():  # keep the other models' rows from an earlier run (one model per run is fine)
        earlier = json.loads(RESULTS.read_text())
        doc["models"] = {**earlier.get("models", {}), **doc["models"]}

    atomic_write_json(doc, RESULTS)
    print(f"\nJSON: {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
