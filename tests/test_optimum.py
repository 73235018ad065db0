"""hf_sparse as an Optimum backend: the OptimumQuantizer subclass and the optimum-cli plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model
from optimum.quantization_base import OptimumQuantizer
from transformers import AutoModelForCausalLM

import hf_sparse
from hf_sparse.modules import PackedNMLinear
from hf_sparse.optimum import HfSparseQuantizer


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dense")
    tiny_model("llama", seed=5).save_pretrained(path)
    return path


def _packed(model) -> dict[str, PackedNMLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedNMLinear)}


def test_quantize_prunes_exports_and_loads_with_from_pretrained(dense_dir, tmp_path):
    quantizer = HfSparseQuantizer.from_pretrained(dense_dir)
    assert isinstance(quantizer, OptimumQuantizer)
    targets = quantizer.target_names()
    out = quantizer.quantize(tmp_path / "export", bits=4, group_size=32)
    # the in-memory model is now exactly 2:4 on every target; the reference is its fake-quantized twin
    for name in targets:
        assert hf_sparse.is_nm_sparse(quantizer.model.get_submodule(name).weight, 2, 4, dim=1), name
    reference = hf_sparse.fake_quantize(quantizer.model, bits=4, group_size=32)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert sorted(_packed(loaded)) == sorted(targets)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_already_sparse_model_is_not_pruned_again(tmp_path):
    model = tiny_model("llama", seed=6)
    quantizer = HfSparseQuantizer(model)
    first = quantizer.prune("magnitude")
    assert first and not any(first.values())
    snapshot = {n: model.get_submodule(n).weight.clone() for n in first}
    second = quantizer.prune("none")  # already 2:4 everywhere: nothing to do, no error
    assert all(second.values())
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in snapshot.items())


def test_bad_arguments_name_the_problem(tmp_path):
    quantizer = HfSparseQuantizer(tiny_model("llama", seed=7))
    with pytest.raises(ValueError, match="not 2:4 sparse.*prune"):
        quantizer.quantize(tmp_path / "x", prune="none")
    with pytest.raises(ValueError, match="file_prefix"):
        quantizer.quantize(tmp_path / "x", file_prefix="model")
    with pytest.raises(ValueError, match="prune"):
        quantizer.prune("lottery")
    with pytest.raises(TypeError, match="model"):
        HfSparseQuantizer("not a model")
    assert not (tmp_path / "x").exists()


def test_optimum_cli_discovers_the_plugin():
    from optimum.commands.export.base import ExportCommand
    from optimum.commands.optimum_cli import load_optimum_namespace_cli_commands

    from hf_sparse.optimum.commands import HfSparseExportCommand

    assert (HfSparseExportCommand, ExportCommand) in load_optimum_namespace_cli_commands()


def test_optimum_cli_export_hf_sparse_end_to_end(dense_dir, tmp_path):
    cli = Path(sys.executable).with_name("optimum-cli")
    assert cli.exists(), f"{cli}: optimum (a dependency) installs this script"
    out = tmp_path / "cli-export"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(cli), "export", "hf-sparse", "-m", str(dense_dir), str(out), "--bits", "4", "--group-size", "32"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert _packed(loaded) and all(m.spec.bits == 4 and m.spec.group_size == 32 for m in _packed(loaded).values())
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.randint(0, VOCAB, (1, 5))).logits).all()


def test_ast_peft_model_exports_its_masks_without_pruning(tmp_path):
    from peft import get_peft_model

    peft_model = get_peft_model(tiny_model("llama", seed=8), hf_sparse.ASTConfig())
    quantizer = HfSparseQuantizer(peft_model)
    with pytest.raises(ValueError, match="already N:M"):
        quantizer.prune()
    out = quantizer.quantize(tmp_path / "ast-export", bits=16)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    merged = peft_model.merge_and_unload().eval()
    assert _packed(loaded)
    for name, module in _packed(loaded).items():
        torch.testing.assert_close(module.weight, merged.get_submodule(name).weight.float(), rtol=0, atol=1e-3)
