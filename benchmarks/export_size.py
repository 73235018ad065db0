"""File sizes of a SmolLM2-135M-shaped model: dense fp32/fp16 vs 2:4 fp16 / int8 / int4 (hf_sparse format).

Prints a table and writes JSON. Ratios are to dense fp32, for the whole checkpoint and for the decoder
linears alone (the tensors that 2:4 + quantization compress; embeddings/norms stay dense fp16).

    python benchmarks/export_size.py [--model DIR] [--output benchmarks/results/export_size.json]

Without --model it builds the SmolLM2-135M architecture (hidden 576, intermediate 1536, 30 layers,
9 heads, 3 kv heads, vocab 49152, tied embeddings) with random weights: sizes do not depend on values.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_sparse
from hf_sparse.sparsity import nm_mask
from hf_sparse.tuners.ast.config import DEFAULT_TARGET_PATTERN

SMOLLM2_135M = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
)
_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I32": 4, "I64": 8}


def tensor_bytes(directory: Path) -> dict[str, int]:
    out = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = math.prod(sl.get_shape()) * _SIZES[sl.get_dtype()]
    return out


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def linear_bytes(tensors: dict[str, int], targets: list[str]) -> int:
    prefixes = tuple(t + "." for t in targets)
    return sum(b for k, b in tensors.items() if k.startswith(prefixes) and not k.endswith(".bias"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a dense checkpoint directory (default: random SmolLM2-135M shape)")
    parser.add_argument("--output", default="benchmarks/results/export_size.json")
    parser.add_argument("--workdir", help="where to write the checkpoints (default: a temp dir, removed)")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        name = args.model
    else:
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_135M), dtype=torch.float32)
        name = "SmolLM2-135M shape (random weights)"
    model.eval()
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(DEFAULT_TARGET_PATTERN, n)]
    with torch.no_grad():  # a merged 2:4 model: magnitude masks applied in place
        for t in targets:
            w = model.get_submodule(t).weight
            w.mul_(nm_mask(w.abs(), 2, 4))

    tmp = tempfile.TemporaryDirectory(dir=args.workdir)
    root = Path(tmp.name)
    rows = []

    def record(label: str, directory: Path, seconds: float) -> None:
        tensors = tensor_bytes(directory)
        rows.append({"format": label, "file_bytes": dir_bytes(directory), "decoder_linear_bytes": linear_bytes(tensors, targets),
                     "seconds": round(seconds, 1)})
        print(f"  wrote {label} in {seconds:.1f}s", flush=True)

    t0 = time.time()
    model.save_pretrained(root / "dense_fp32")
    record("dense fp32", root / "dense_fp32", time.time() - t0)
    for label, bits in (("2:4 fp16", 16), ("2:4 + int8 (g128)", 8), ("2:4 + int4 (g128)", 4)):
        t0 = time.time()
        out = root / f"sparse_2of4_{bits}"
        hf_sparse.export(model, out, bits=bits, group_size=128, dtype=torch.float16, targets=targets)
        record(label, out, time.time() - t0)
    t0 = time.time()
    model.to(torch.float16).save_pretrained(root / "dense_fp16")
    record("dense fp16", root / "dense_fp16", time.time() - t0)
    rows.insert(1, rows.pop())  # order: fp32, fp16, 2:4 fp16, int8, int4

    base_file, base_lin = rows[0]["file_bytes"], rows[0]["decoder_linear_bytes"]
    for r in rows:
        r["ratio_file_vs_fp32"] = round(base_file / r["file_bytes"], 2)
        r["ratio_linears_vs_fp32"] = round(base_lin / r["decoder_linear_bytes"], 2)
    print(f"\nExport sizes for {name}: {len(targets)} decoder linears, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters\n")
    print(f"{'format':<20} {'file MB':>9} {'x smaller':>10} {'linears MB':>11} {'x smaller':>10}")
    for r in rows:
        print(f"{r['format']:<20} {r['file_bytes'] / 1e6:>9.1f} {r['ratio_file_vs_fp32']:>10.2f} "
              f"{r['decoder_linear_bytes'] / 1e6:>11.1f} {r['ratio_linears_vs_fp32']:>10.2f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"model": name, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
