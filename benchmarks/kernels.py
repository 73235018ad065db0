"""GPU benchmark of hf_sparse's matmul paths: per-layer ratios vs dense fp16, and end-to-end tokens/s.

Per layer (Llama-2-7B shapes [out, in] = 4096x4096, 11008x4096, 4096x11008; M = 1, 16, 128, 2048, 8192):
  dense fp16 (F.linear)                         the baseline of every ratio
  2:4 fp16    torch.sparse.to_sparse_semi_structured (cuSPARSELt / CUTLASS)
  int4 dense  torch's tinygemm (aten._weight_int4pack_mm, bf16 activations), if this torch has it
  int4 x 2:4  hf_sparse's Triton kernel (best of a few launch configs)
  dispatch    what hf_sparse.kernels.autotune picks (dense always a candidate), timed again on fresh data
End to end (Llama-7B-shaped, random weights): prefill and decode tokens/s for dense fp16, the exported
2:4 fp16 checkpoint and the exported 2:4 + int4 checkpoint, each loaded with ``from_pretrained``.

Method: CUDA events around each call, L2 flushed before every timed call, warm-up first, median of
``--reps``; inputs are fresh random tensors drawn for every repetition (a pool, drawn before timing).
Ratios are dense_time / path_time (>1 = faster than dense), all in one run on one GPU.

    python benchmarks/kernels.py                       # on a GPU: full run, table + JSON
    python benchmarks/kernels.py --dry-run             # on CPU: tiny shapes, checks the script end to end
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "--dry-run" in sys.argv:
    # CPU dry run: the Triton kernel runs on CPU only in the interpreter, chosen before anything imports
    # triton (transformers does). On a GPU box the dry run still compiles the real kernel.
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
LLAMA_MS = [1, 16, 128, 2048, 8192]
TINY_SHAPES = [(64, 64), (128, 64), (64, 128)]
TINY_MS = [1, 4, 16]
GROUP_SIZE = 128


# ---------------------------------------------------------------------------------------------- timing
class Timer:
    """Median time of ``fn(inputs[i])`` over fresh inputs, CUDA events + L2 flush on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps
        self.flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device) if device.type == "cuda" else None

    def __call__(self, fn, inputs: list[torch.Tensor]) -> float:
        for i in range(self.warmup):
            fn(inputs[i % len(inputs)])
        samples = []
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            for i in range(self.reps):
                self.flush.zero_()  # evict the weights from L2: decode reads them from HBM in a real model
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(inputs[i % len(inputs)])
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
        else:
            for i in range(self.reps):
                t0 = time.perf_counter()
                fn(inputs[i % len(inputs)])
                samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)


# ------------------------------------------------------------------------------------------ weights
def random_24_weight(out_f: int, in_f: int, device, dtype=torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    from hf_sparse.sparsity import nm_mask

    w = torch.randn(out_f, in_f, device=device, dtype=torch.float32) * 0.02
    mask = nm_mask(w.abs(), 2, 4, dim=1)
    return (w * mask).to(dtype), mask


def pack_w4_24(w: torch.Tensor, mask: torch.Tensor, group_size: int) -> dict:
    """Symmetric RTN int4 of the kept values in the export layout (independent of the exporter, for layers)."""
    from hf_sparse.sparsity import compress_nm, pack_bits

    vals, pos = compress_nm(w.float(), mask, 2, 4)
    g = vals.reshape(vals.shape[0], -1, group_size // 2)
    scale = (g.abs().amax(-1) / 7.0).clamp_min(1e-8)
    codes = (torch.round(g / scale[..., None]) + 8).clamp(0, 15).to(torch.uint8).reshape(vals.shape)
    return dict(values=pack_bits(codes, 4), positions=pack_bits(pos, 2), scales=scale.to(torch.float16), zeros=None)


def tinygemm_pack(w: torch.Tensor, group_size: int):
    """torch's int4 dense (tinygemm) operands for ``w``: (packed, scales_and_zeros) or raises if unsupported."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(out_f, in_f)
    zero = lo + 8 * scale  # tinygemm: w = (q - 8) * scale + zero
    packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


# ------------------------------------------------------------------------------------------ per layer
def bench_layers(shapes, ms, device, timer: Timer, pool: int, group_size: int, max_configs: int = 8) -> list[dict]:
    from hf_sparse.kernels import autotune
    from hf_sparse.kernels.triton_w4a16_nm import HAS_TRITON, candidate_configs, w4a16_nm24_matmul

    rows = []
    for out_f, in_f in shapes:
        torch.manual_seed(out_f * 7 + in_f)
        w_dense = (torch.randn(out_f, in_f, device=device) * 0.02).to(torch.float16)
        w24, mask = random_24_weight(out_f, in_f, device)
        packed = pack_w4_24(w24, mask, group_size)
        semi = None
        semi_err = ""
        try:
            semi = torch.sparse.to_sparse_semi_structured(w24)
        except Exception as exc:
            semi_err = f"{type(exc).__name__}: {exc}"[:120]
        tiny = None
        tiny_err = ""
        try:
            tiny = tinygemm_pack(w_dense, group_size)
        except Exception as exc:
            tiny_err = f"{type(exc).__name__}: {exc}"[:120]

        for m in ms:
            xs = [torch.randn(m, in_f, device=device, dtype=torch.float16) for _ in range(pool)]
            xs_bf = [x.to(torch.bfloat16) for x in xs]
            row = {"out": out_f, "in": in_f, "M": m, "ms": {}, "ratio": {}, "notes": {}}
            t_dense = timer(lambda x: F.linear(x, w_dense), xs)
            row["ms"]["dense_fp16"] = t_dense
            paths = {"dense": lambda x: F.linear(x, w24)}
            if semi is not None:
                try:
                    row["ms"]["sparse24_fp16"] = timer(lambda x: F.linear(x, semi), xs)
                    paths["semi_structured"] = lambda x: F.linear(x, semi)
                except Exception as exc:
                    row["notes"]["sparse24_fp16"] = f"{type(exc).__name__}: {exc}"[:120]
            else:
                row["notes"]["sparse24_fp16"] = semi_err
            if tiny is not None:
                try:
                    row["ms"]["int4_dense"] = timer(
                        lambda x: torch.ops.aten._weight_int4pack_mm(x, tiny[0], group_size, tiny[1]), xs_bf
                    )
                except Exception as exc:
                    row["notes"]["int4_dense"] = f"{type(exc).__name__}: {exc}"[:120]
            else:
                row["notes"]["int4_dense"] = tiny_err
            if HAS_TRITON:
                best, best_cfg = None, None
                cfgs = candidate_configs(m, out_f, in_f)[: max_configs if device.type == "cuda" else 1]
                for cfg in cfgs:
                    try:
                        t = timer(lambda x, cfg=cfg: w4a16_nm24_matmul(x, **packed, group_size=group_size, config=cfg), xs)
                    except Exception as exc:
                        row["notes"].setdefault("int4_sparse24", f"{cfg}: {type(exc).__name__}: {exc}"[:120])
                        continue
                    if best is None or t < best:
                        best, best_cfg = t, cfg
                if best is not None:
                    row["ms"]["int4_sparse24"] = best
                    row["notes"]["int4_sparse24_cfg"] = best_cfg.as_dict()
                    paths["triton_w4a16"] = (
                        lambda x, cfg=best_cfg: w4a16_nm24_matmul(x, **packed, group_size=group_size, config=cfg)
                    )
            # the dispatch's decision (fresh measurement, no cache) then timed again on fresh inputs.
            # triton_w4a16 computes a quantized weight: its error vs fp16 2:4 is quantization, so the
            # correctness gate is loose here; the exact kernel checks are in tests/test_kernels_triton.py
            key = autotune.TuneKey(autotune.device_name(device), out_f, in_f, autotune.m_bucket(m), "float16", "bench")
            choice = autotune.select_backend(
                key, paths, lambda: torch.randn(m, in_f, device=device, dtype=torch.float16),
                measure=True, timer=lambda fn: timer(lambda _x: fn(), xs[:1]), rel_tol=0.25,
            )
            row["notes"]["dispatch_choice"] = choice.backend
            row["ms"]["dispatch"] = timer(paths[choice.backend], xs)
            row["ratio"] = {k: t_dense / v for k, v in row["ms"].items()}
            rows.append(row)
            print(format_layer_row(row), flush=True)
    return rows


LAYER_COLS = ["dense_fp16", "sparse24_fp16", "int4_dense", "int4_sparse24", "dispatch"]


def format_layer_header() -> str:
    return f"{'shape [out x in]':>18} {'M':>5} {'dense ms':>9} " + " ".join(f"{c:>14}" for c in LAYER_COLS[1:]) + "  choice"


def format_layer_row(row: dict) -> str:
    cells = []
    for c in LAYER_COLS[1:]:
        cells.append(f"{row['ratio'][c]:>13.2f}x" if c in row["ratio"] else f"{'n/a':>14}")
    shape = f"{row['out']}x{row['in']}"
    return f"{shape:>18} {row['M']:>5} {row['ms']['dense_fp16']:>9.4f} " + " ".join(cells) + f"  {row['notes'].get('dispatch_choice', '')}"


# ----------------------------------------------------------------------------------------- end to end
def llama_config(tiny: bool, num_layers: int | None):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers or 2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=num_layers or 32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


@torch.no_grad()
def time_generation(model, device, prompt_len: int, new_tokens: int, batch: int, reps: int) -> dict:
    """Prefill tokens/s (one forward of the prompt) and decode tokens/s (greedy steps with the KV cache)."""
    vocab = model.config.vocab_size

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    prefill, decode = [], []
    for r in range(reps + 1):  # the first round is the warm-up (and triggers the dispatch's measurements)
        ids = torch.randint(0, vocab, (batch, prompt_len), device=device)
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        sync()
        t1 = time.perf_counter()
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()
        t2 = time.perf_counter()
        if r:
            prefill.append(batch * prompt_len / (t1 - t0))
            decode.append(batch * new_tokens / (t2 - t1))
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode)}


def bench_end_to_end(args, device) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from hf_sparse.sparsity import nm_mask

    tiny = args.dry_run
    cfg = llama_config(tiny, args.num_layers)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    results = []
    gen = dict(prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=args.batch, reps=args.e2e_reps)
    r = {"model": f"dense {str(dtype).removeprefix('torch.')}", **time_generation(model, device, **gen)}
    results.append(r)
    print(format_e2e_row(r), flush=True)
    # magnitude 2:4 on every decoder linear (random weights: the pattern, not the quality, matters here)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                mod.weight.mul_(nm_mask(mod.weight.abs(), 2, 4, dim=1))
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        for label, bits in (("exported 2:4 (16-bit)", 16), ("exported 2:4 + int4", 4)):
            out_dir = Path(tmp) / f"export-{bits}"
            t0 = time.perf_counter()
            export_model(model, out_dir, bits=bits, group_size=32 if tiny else GROUP_SIZE)
            t_export = time.perf_counter() - t0
            loaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype, device_map=str(device)).eval()
            r = {"model": label, **time_generation(loaded, device, **gen), "export_s": t_export,
                 "disk_bytes": sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))}
            r["paths"] = dispatch_summary(loaded)
            results.append(r)
            print(format_e2e_row(r, results[0]), flush=True)
            del loaded
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def export_model(model, out_dir: Path, bits: int, group_size: int) -> None:
    """Write ``model`` (already 2:4) with hf_sparse's exporter (the same code `hf-sparse export` runs)."""
    from hf_sparse import export

    export(model, out_dir, bits=bits, group_size=group_size)


def dispatch_summary(model) -> dict:
    """How many packed linears use each path per M bucket (from the dispatch's per-module memo)."""
    counts: dict[str, int] = {}
    for mod in model.modules():
        for (_, _, _, bucket, _), path in mod.__dict__.get("_dispatch_memo", {}).items():
            counts[f"m{bucket}:{path}"] = counts.get(f"m{bucket}:{path}", 0) + 1
    return counts


def format_e2e_row(r: dict, base: dict | None = None) -> str:
    s = f"{r['model']:>22}  prefill {r['prefill_tok_s']:>10.1f} tok/s  decode {r['decode_tok_s']:>8.1f} tok/s"
    if base is not None:
        s += f"  ({r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x, {r['decode_tok_s'] / base['decode_tok_s']:.2f}x vs dense)"
    return s


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes and model; runs on CPU (Triton interpreter)")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/kernels-<gpu>.json; dry run: the temp dir)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (median)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--pool", type=int, default=4, help="distinct random inputs cycled through the repetitions")
    p.add_argument("--max-configs", type=int, default=8, help="Triton launch configs tried per shape and M (compile time)")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--num-layers", type=int, default=None, help="decoder layers of the e2e model (default 32; 2 in dry run)")
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--e2e-reps", type=int, default=None)
    p.add_argument("--tmp-dir", default=None, help="where the e2e exports are written (needs ~10 GB for 7B)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.dry_run:
        p.error("no CUDA GPU: the benchmark measures GPU kernels; use --dry-run to check the script on CPU")
    dry = args.dry_run
    args.reps = args.reps or (3 if dry else 30)
    args.warmup = args.warmup or (1 if dry else 10)
    args.prompt_len = args.prompt_len or (16 if dry else 512)
    args.new_tokens = args.new_tokens or (4 if dry else 64)
    args.e2e_reps = args.e2e_reps or (1 if dry else 3)
    if args.num_layers is None and dry:
        args.num_layers = 2
    if dry:  # never write the dry run's autotune decisions into the user's cache
        os.environ.setdefault("HF_SPARSE_CACHE_DIR", tempfile.mkdtemp(prefix="hf-sparse-bench-cache-"))

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {gpu}  torch {torch.__version__}  dry_run={dry}", flush=True)
    timer = Timer(device, args.warmup, args.reps)
    report = {"device": gpu, "torch": torch.__version__, "dry_run": dry, "group_size": 32 if dry else GROUP_SIZE,
              "reps": args.reps, "warmup": args.warmup, "layers": [], "end_to_end": []}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    if not args.skip_layers:
        print("\nper layer: ratio = dense fp16 time / path time (>1 faster)\n" + format_layer_header(), flush=True)
        report["layers"] = bench_layers(TINY_SHAPES if dry else LLAMA_SHAPES, TINY_MS if dry else LLAMA_MS, device, timer, args.pool,
                                       32 if dry else GROUP_SIZE, args.max_configs)
    if not args.skip_e2e:
        print(f"\nend to end: Llama-7B-shaped random weights ({'tiny' if dry else 'full'}), batch {args.batch}, "
              f"prompt {args.prompt_len}, {args.new_tokens} new tokens", flush=True)
        report["end_to_end"] = bench_end_to_end(args, device)
    if args.out is not None:
        out = args.out
    elif dry:  # a dry run's numbers mean nothing: keep them out of the repository
        out = Path(tempfile.gettempdir()) / "hf-sparse-kernels-dryrun.json"
    else:
        out = Path(__file__).parent / "results" / f"kernels-{gpu.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
