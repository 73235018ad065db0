"""Writing an output directory never destroys the user's files (issue: export deleted existing folders).

Real exports of tiny models, the real CLI verbs, and real SIGKILLs of a child process at the worst moments.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import hf_sparse
from hf_sparse import ASTConfig
from hf_sparse.atomic import MARKER_NAME, OutputDirectoryError, atomic_directory, recover_interrupted
from hf_sparse.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def ast_model(seed: int = 0):
    return get_peft_model(tiny_model("llama", seed=seed), ASTConfig())


@pytest.fixture
def merged_dir(tmp_path) -> Path:
    """A merged 2:4 checkpoint directory, as `hf-sparse export SOURCE` takes it."""
    path = tmp_path / "proj" / "merged"
    ast_model().merge_and_unload().save_pretrained(path)
    return path


def files(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# ------------------------------------------------------------------ the rule: whose directory may be replaced


def test_export_refuses_a_directory_with_user_files_and_changes_nothing(tmp_path):
    out = tmp_path / "u"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirectoryError, match=r"'.*u'.*overwrite=True"):
        hf_sparse.export(ast_model(), out)
    assert files(out) == {"notes.txt"} and (out / "notes.txt").read_text() == "mine"
    assert siblings(out) == ["u"]  # no temp folder left beside it


def test_overwrite_true_replaces_a_foreign_directory(tmp_path):
    out = tmp_path / "u"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    hf_sparse.export(ast_model(), out, overwrite=True)
    assert "notes.txt" not in files(out) and (out / "config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(out).config.quantization_config.n == 2


def test_empty_directory_and_previous_export_are_replaced(tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    hf_sparse.export(ast_model(), out, bits=16)  # empty: nothing to lose
    written = json.loads((out / MARKER_NAME).read_text())
    assert written["writer"] == "hf_sparse.export" and "config.json" in written["files"]
    hf_sparse.export(ast_model(), out, bits=4, group_size=32)  # a previous export of ours: replaced whole
    assert AutoModelForCausalLM.from_pretrained(out).config.quantization_config.bits == 4
    assert siblings(out) == ["e"]


def test_previous_export_with_an_added_user_file_is_refused(tmp_path):
    out = tmp_path / "e"
    hf_sparse.export(ast_model(), out)
    (out / "eval_notes.md").write_text("my results")
    with pytest.raises(OutputDirectoryError, match="did not write"):
        hf_sparse.export(ast_model(), out)
    assert (out / "eval_notes.md").read_text() == "my results"


def test_legacy_export_without_marker_is_recognised_by_its_config(tmp_path):
    out = tmp_path / "old"
    hf_sparse.export(ast_model(), out)
    (out / MARKER_NAME).unlink()  # written by a version before the marker
    hf_sparse.export(ast_model(), out, bits=8, group_size=32)
    assert AutoModelForCausalLM.from_pretrained(out).config.quantization_config.bits == 8


def test_never_the_current_directory_or_a_parent_even_with_overwrite(tmp_path, monkeypatch):
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    (work / "train.py").write_text("print('hi')")
    monkeypatch.chdir(work)
    for target in (".", "..", str(work)):
        with pytest.raises(OutputDirectoryError, match="current directory"):
            hf_sparse.export(ast_model(), target, overwrite=True)
    assert (work / "train.py").read_text() == "print('hi')"


def test_never_the_source_or_a_folder_containing_it(merged_dir):
    proj = merged_dir.parent
    (proj / "train.py").write_text("x = 1")
    for target in (merged_dir, proj):
        with pytest.raises(OutputDirectoryError, match="source"):
            hf_sparse.export(str(merged_dir), target, overwrite=True)
    assert (proj / "train.py").exists() and (merged_dir / "config.json").exists()


# ------------------------------------------------------------------ the CLI verbs


def test_cli_export_refuses_user_dir_source_parent_and_cwd(merged_dir, monkeypatch, capsys):
    proj = merged_dir.parent
    (proj / "train.py").write_text("x = 1")
    u = proj.parent / "u"
    u.mkdir()
    (u / "notes.txt").write_text("mine")
    for out in (u, proj):
        with pytest.raises(SystemExit, match="hf-sparse export: .*(did not write|source)"):
            cli_main(["export", str(merged_dir), str(out)])
    monkeypatch.chdir(proj)
    with pytest.raises(SystemExit, match="current directory"):
        cli_main(["export", "merged", ".", "--overwrite"])
    assert (u / "notes.txt").exists() and (proj / "train.py").exists() and (merged_dir / "config.json").exists()
    # --overwrite is the explicit way to replace a foreign directory
    assert cli_main(["export", str(merged_dir), str(u), "--overwrite"]) == 0
    assert not (u / "notes.txt").exists() and (u / "config.json").exists()


def test_cli_prune_refuses_a_directory_with_user_files(merged_dir):
    out = merged_dir.parent.parent / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="hf-sparse prune: .*--output-dir.*did not write"):
        cli_main(["prune", "--method", "magnitude", "--model", str(merged_dir), "--output-dir", str(out)])
    with pytest.raises(SystemExit, match="source"):
        cli_main(["prune", "--method", "magnitude", "--model", str(merged_dir), "--output-dir", str(merged_dir)])
    assert (out / "keep.txt").exists()


def test_compressed_tensors_export_follows_the_same_rule(tmp_path):
    pytest.importorskip("compressed_tensors")
    from hf_sparse.integrations.compressed_tensors import export_compressed_tensors

    out = tmp_path / "ct"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirectoryError):
        export_compressed_tensors(ast_model(), out, bits=16)
    assert files(out) == {"notes.txt"}
    export_compressed_tensors(ast_model(), tmp_path / "ct2", bits=16)
    export_compressed_tensors(ast_model(), tmp_path / "ct2", bits=16)  # a previous output of ours: replaced


# ------------------------------------------------------------------ kills: leftovers and the gap between renames

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import tiny_model
    from peft import get_peft_model
    import hf_sparse
    from hf_sparse import ASTConfig

    out, when = sys.argv[1], sys.argv[2]
    real_rename = os.rename
    def rename(src, dst):
        real_rename(src, dst)
        if when == "between-renames" and ".old-" in str(dst):  # previous export moved aside, new one not in place
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
    if when == "while-writing":
        import importlib
        api = importlib.import_module("hf_sparse.exporters.api")
        real_write = api.write_shards
        def write_shards(tensors, directory, **kw):
            real_write(tensors, directory, **kw)
            os.kill(os.getpid(), signal.SIGKILL)
        api.write_shards = write_shards
    model = get_peft_model(tiny_model("llama", seed=1), ASTConfig())
    hf_sparse.export(model, out, bits=8, group_size=32)
    """
)


def _export_killed(tmp_path: Path, out: Path, when: str) -> None:
    script = tmp_path.parent / f"{tmp_path.name}-child.py"  # not beside `out`: the tests list out's siblings
    script.write_text(_CHILD.format(tests=str(REPO / "tests")))
    proc = subprocess.run([sys.executable, str(script), str(out), when], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_kill_between_the_two_renames_never_loses_the_previous_export(tmp_path):
    out = tmp_path / "export"
    hf_sparse.export(ast_model(), out, bits=4, group_size=32)
    before = {f: (out / f).read_bytes() for f in files(out)}
    _export_killed(tmp_path, out, "between-renames")
    assert not out.exists() and any(".export.old-" in n for n in siblings(out))  # the kill hit the gap
    recover_interrupted(out)  # what the next export (or a user) runs first
    assert {f: (out / f).read_bytes() for f in files(out)} == before
    assert siblings(out) == ["export"]
    assert AutoModelForCausalLM.from_pretrained(out).config.quantization_config.bits == 4


def test_next_export_after_a_kill_cleans_leftovers(tmp_path):
    out = tmp_path / "export"
    hf_sparse.export(ast_model(), out, bits=4, group_size=32)
    _export_killed(tmp_path, out, "while-writing")
    assert any(".export.tmp-" in n for n in siblings(out))
    assert AutoModelForCausalLM.from_pretrained(out).config.quantization_config.bits == 4  # untouched
    _export_killed(tmp_path, out, "between-renames")
    hf_sparse.export(ast_model(), out, bits=16)  # recovers, then replaces its own previous export
    assert siblings(out) == ["export"]
    assert AutoModelForCausalLM.from_pretrained(out).config.quantization_config.bits == 16


def test_a_live_writers_temp_folder_is_left_alone(tmp_path):
    out = tmp_path / "o"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("1")
        recover_interrupted(out)  # another run starting now must not delete our temp folder
        assert tmp.exists()
    assert files(out) == {"a.txt", MARKER_NAME}


def test_export_rejects_a_non_float_dtype(tmp_path):
    with pytest.raises(ValueError, match="argument `dtype`"):
        hf_sparse.export(ast_model(), tmp_path / "x", dtype=torch.int8)
    assert not (tmp_path / "x").exists()


def test_hub_upload_set_does_not_carry_the_marker(tmp_path):
    from hf_sparse.integrations.hub import upload_file_set

    out = tmp_path / "e"
    hf_sparse.export(ast_model(), out)
    assert MARKER_NAME not in upload_file_set(out) and "config.json" in upload_file_set(out)


def test_dead_pid_leftovers_are_removed(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    dead = tmp_path / f".o.tmp-{2**22 + 12345}-deadbeef"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    os.utime(dead)
    recover_interrupted(out)
    assert not dead.exists() and out.exists()
