"""The layer order is checked, not just documented: no import cycle, no import from a higher layer, README agrees."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_layers", REPO / "scripts" / "check_layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_cycles_and_no_upward_imports():
    problems = _checker().check()
    assert problems == [], "\n".join(problems)


def test_the_check_fails_on_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checker itself can fail: a copy of two modules with a planted upward import and a cycle."""
    checker = _checker()
    pkg = tmp_path / "hf_sparse"
    (pkg / "sparsity").mkdir(parents=True)
    (pkg / "training").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sparsity" / "__init__.py").write_text("from ..training import trainer\n")  # foundation -> training
    (pkg / "training" / "__init__.py").write_text("")
    (pkg / "training" / "trainer.py").write_text("from . import callbacks\n")
    (pkg / "training" / "callbacks.py").write_text("from .trainer import X\n")
    monkeypatch.setattr(checker, "ROOT", pkg)
    problems = checker.check()
    assert any("hf_sparse.sparsity (foundation) imports hf_sparse.training.trainer (training)" in p for p in problems)
    assert any(p.startswith("import cycle:") and "callbacks" in p and "trainer" in p for p in problems)


def test_every_module_has_a_layer_and_the_readme_documents_the_order():
    checker = _checker()
    assert all(checker.layer_of(m) is not None for m in checker.all_modules())
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    line = re.search(r"^Layer order \(bottom first\): (.+)$", readme, re.M)
    assert line, "README's Layout section states the layer order"
    documented = [part.strip(" `.") for part in line.group(1).split("→")]
    assert documented == [name for name, _ in checker.LAYERS]


def test_script_runs_standalone():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "check_layers.py")], capture_output=True, text=True)
    assert out.returncode == 0 and "layers ok" in out.stdout, out.stdout
