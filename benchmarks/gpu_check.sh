#!/usr/bin/env bash
# One-shot GPU check for issue 6 (kernels): GPU tests, then the benchmark. Sized for one H100 in < 10 min.
# Usage (repo root, on the GPU machine; its python3 already has torch/transformers/peft/triton):
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to $OUT or ./gpu-check
#   GPU_CHECK_DRY_RUN=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh /tmp/x   # CPU rehearsal (tiny shapes)
# Writes OUT_DIR/tests.log, OUT_DIR/bench.log, OUT_DIR/kernels.json, OUT_DIR/autotune.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_SPARSE_CACHE_DIR="$OUT_DIR/autotune-cache"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT_DIR/gpu.txt"
DRY=()
[ "${GPU_CHECK_DRY_RUN:-0}" = 1 ] && DRY=(--dry-run)
$PY -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT_DIR/gpu.txt"

# 1. correctness on the GPU (kernel vs dense reference, dispatch, loading exports on CUDA)
timeout 240 $PY -m pytest -q -p no:cacheprovider -m gpu -o addopts="" \
  tests/test_kernels_triton.py tests/test_dispatch.py tests/test_load_gpu.py 2>&1 | tee "$OUT_DIR/tests.log"

# 2. the benchmark: per-layer ratios (Llama-2-7B shapes) + end to end (8 decoder layers of Llama-7B shape)
timeout 420 $PY benchmarks/kernels.py "${DRY[@]}" --num-layers 8 --max-configs 4 --tmp-dir /tmp \
  --out "$OUT_DIR/kernels.json" 2>&1 | tee "$OUT_DIR/bench.log"
cp "$HF_SPARSE_CACHE_DIR/autotune.json" "$OUT_DIR/autotune.json" 2>/dev/null || true
rm -rf "$HF_SPARSE_CACHE_DIR"
