"""What ``get_memory_footprint()`` reports vs the resident memory a loaded export really adds, before and after the
first forward (when the kernels build their cached weights: the dequantized dense copy, converted low-bit weights).

SmolLM2-135M architecture with random weights (sizes do not depend on values), magnitude 2:4, exported as 2:4 fp16
and 2:4 + int4 (g128); each variant loads in its own process. "model RSS" = resident memory after the step minus the
process's resident memory after the imports. Ratios are to the dense fp32 model's own numbers.

    python benchmarks/memory_footprint.py [--tokens 32] [--output benchmarks/results/memory_footprint.json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys
import torch, transformers, hf_sparse
from transformers import AutoModelForCausalLM
from hf_sparse.kernels.cpu import release_freed_memory

def rss():
    release_freed_memory()
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

base = rss()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
out = {"footprint_load": model.get_memory_footprint(), "rss_load": rss() - base}
ids = torch.randint(0, model.config.vocab_size, (1, int(sys.argv[2])))
with torch.no_grad():
    model(ids)
out.update(footprint_forward=model.get_memory_footprint(), rss_forward=rss() - base)
print("RESULT " + json.dumps(out))
"""


def measure(directory: Path, tokens: int) -> dict[str, int]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(directory), str(tokens)], capture_output=True, text=True, check=True)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--output", default="benchmarks/results/memory_footprint.json")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import hf_sparse
    from hf_sparse.sparsity import nm_mask
    from hf_sparse.tuners.ast.config import DEFAULT_TARGET_PATTERN

    sys.path.insert(0, str(Path(__file__).parent))
    from export_size import SMOLLM2_135M

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_135M), dtype=torch.float32).eval()
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(DEFAULT_TARGET_PATTERN, n)]
    with torch.no_grad():
        for t in targets:
            w = model.get_submodule(t).weight
            w.mul_(nm_mask(w.abs(), 2, 4))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model.save_pretrained(root / "dense")
        variants = [("dense fp32", root / "dense")]
        for label, bits in (("2:4 fp16", 16), ("2:4 + int4 (g128)", 4)):
            hf_sparse.export(model, root / f"b{bits}", bits=bits, group_size=128, dtype=torch.float16, targets=targets)
            variants.append((label, root / f"b{bits}"))
        del model
        for label, directory in variants:
            rows.append({"format": label, **measure(directory, args.tokens)})
            print(f"  measured {label}", flush=True)
    dense = rows[0]
    print(f"\n{'format':<20} {'footprint load':>15} {'RSS load':>9} {'footprint fwd':>14} {'RSS fwd':>8}   (x dense fp32)")
    for r in rows:
        for k in ("footprint_load", "rss_load", "footprint_forward", "rss_forward"):
            r[k + "_x_dense"] = round(r[k] / dense[k], 2)
        print(f"{r['format']:<20} {r['footprint_load_x_dense']:>15.2f} {r['rss_load_x_dense']:>9.2f} "
              f"{r['footprint_forward_x_dense']:>14.2f} {r['rss_forward_x_dense']:>8.2f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"model": "SmolLM2-135M shape (random weights)", "tokens": args.tokens,
                                             "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
