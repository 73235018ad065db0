"""The CLI verbs take the same flags for the same things (export, prune): paths, calibration, targets, group size."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from hf_sparse import ASTConfig
from hf_sparse.cli import main
from hf_sparse.sparsity.nm import input_dim_of, nm_violations


@pytest.fixture
def merged_dir(tmp_path):
    path = tmp_path / "merged"
    get_peft_model(tiny_model("llama"), ASTConfig()).merge_and_unload().save_pretrained(path)
    return path


def test_export_takes_prune_style_path_flags_and_group_size_minus_one(merged_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["export", "--model", str(merged_dir), "--output-dir", str(out), "--bits", "4", "--group-size", "-1",
                 "--targets", "q_proj", "v_proj"]) == 0
    qc = AutoModelForCausalLM.from_pretrained(out).config.quantization_config
    assert qc.group_size is None and qc.bits == 4  # per output channel, as GPTQConfig(group_size=-1)
    assert qc.targets and all(t.endswith(("q_proj", "v_proj")) for t in qc.targets)
    with pytest.raises(SystemExit, match="SOURCE given twice"):
        main(["export", str(merged_dir), str(tmp_path / "o2"), "--model", str(tmp_path / "other")])


def test_prune_takes_targets_and_exclude(tmp_path):
    src = tmp_path / "dense"
    tiny_model("llama").save_pretrained(src)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                  unk_token="[UNK]")
    tok.save_pretrained(src)
    out = tmp_path / "pruned"
    assert main(["prune", "--method", "magnitude", "--model", str(src), "--output-dir", str(out),
                 "--targets", "mlp.up_proj", "mlp.down_proj", "--exclude", "layers.1.mlp.down_proj"]) == 0
    pruned = AutoModelForCausalLM.from_pretrained(out)
    report = json.loads((out / "hf_sparse_oneshot.json").read_text())
    assert report["num_targets"] == 3
    for name, module in pruned.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers"):
            sparse = not nm_violations(module.weight, 2, 4, dim=input_dim_of(module))
            expected = name.endswith(("mlp.up_proj", "mlp.down_proj")) and name != "model.layers.1.mlp.down_proj"
            assert sparse == expected, name
