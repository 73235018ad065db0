#!/usr/bin/env bash
# One-time setup on a fresh CPU machine: a virtualenv in .venv with the pinned CPU torch build,
# the package (editable) with its dev/demo extras, and the offline default assets.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints/cpu.txt -e ".[dev,demo,interop]"
if .venv/bin/python -c "import hf_sparse.assets" 2>/dev/null; then
  .venv/bin/python -m hf_sparse.assets fetch
fi
echo "hf_sparse is set up in .venv"
