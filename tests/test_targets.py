"""One target selector with PEFT's semantics: the same inputs select the same modules as LoRA's `target_modules`."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import tiny_model
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

import hf_sparse
from hf_sparse import ASTConfig
from hf_sparse.oneshot import select_targets
from hf_sparse.optimum import HfSparseQuantizer
from hf_sparse.targets import TargetSelector, matches
from hf_sparse.tuners.ast import ASTLayer

# (target_modules, exclude_modules): each row is run through LoRA and through hf_sparse's selector
TABLE = [
    (["q_proj"], []),
    (["self_attn.q_proj"], []),
    (["q_proj", "down_proj"], []),
    (["model.layers.0.self_attn.v_proj"], []),
    (["layers.1.mlp.up_proj"], []),
    ("model.layers.0.self_attn.q_proj", []),
    (r".*\.mlp\..*_proj", []),
    (r".*(q|k)_proj", []),
    (["gate_proj", "up_proj", "down_proj"], ["down_proj"]),
    (r".*_proj", r".*layers\.0\..*"),
    (["o_proj", "up_proj"], ["layers.1.self_attn.o_proj"]),
]


def names_of(model: torch.nn.Module, layer_type: type) -> list[str]:
    inner = model.get_base_model()
    return [n for n, m in inner.named_modules() if isinstance(m, layer_type)]


@pytest.mark.parametrize("target_modules, exclude_modules", TABLE)
def test_same_matches_as_lora(target_modules, exclude_modules):
    model = tiny_model("llama")
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=target_modules,
                                                           exclude_modules=exclude_modules or None))
    expected = names_of(lora, LoraLayer)
    assert expected, "the table row must select something"
    selector = TargetSelector(target_modules, exclude_modules)
    assert selector.select(model).modules == expected
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ast = get_peft_model(copy.deepcopy(model), ASTConfig(target_modules=target_modules, exclude_modules=exclude_modules))
    assert not [w for w in caught if "pass a regex as a str" in str(w.message)]  # PEFT-style inputs: no legacy path
    assert names_of(ast, ASTLayer) == expected
    assert list(select_targets(model, target_modules, exclude_modules)) == expected  # one-shot
    assert HfSparseQuantizer(copy.deepcopy(model), target_modules=target_modules,
                             exclude_modules=exclude_modules).target_names() == expected  # Optimum


def test_export_targets_follow_the_same_rule(tmp_path):
    model = tiny_model("llama")
    hf_sparse.prune_oneshot(model, "magnitude")  # every default target is 2:4 now
    out = hf_sparse.export(model, tmp_path / "e", targets=["q_proj", "mlp.down_proj"])
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)
    expected = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "mlp.down_proj"))]
    assert loaded.config.quantization_config.targets == expected


def test_default_targets_decoder_linears_and_routers_excluded():
    mixtral = tiny_model("mixtral")
    found = TargetSelector().select(mixtral)
    assert all(".layers." in n for n in found.modules) and "lm_head" not in found.modules
    assert {n.rsplit(".", 1)[-1] for n in found.excluded} == {"gate"}  # the router
    assert TargetSelector(exclude_modules=[]).select(mixtral).excluded == set()


def test_self_attn_q_proj_means_the_same_in_ast_and_lora():
    """The review's example: a dotted suffix in a list (it matched nothing in AST before)."""
    model = tiny_model("llama")
    ast = get_peft_model(copy.deepcopy(model), ASTConfig(target_modules=["self_attn.q_proj"]))
    assert names_of(ast, ASTLayer) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_legacy_regex_list_still_works_with_a_future_warning():
    model = tiny_model("llama")
    with pytest.warns(FutureWarning, match=r"pass a regex as a str"):
        got = TargetSelector([r".*\.mlp\.(up|down)_proj"], []).select(model).modules  # unique: warned once per entry
    assert got == TargetSelector(r".*\.mlp\.(up|down)_proj", []).select(model).modules and len(got) == 4
    assert not matches("model.layers.0.mlp.up_proj", ["mlp.*"])  # no regex syntax but '.': a plain name, no match


def test_errors_name_the_argument():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="argument `target_modules`=\\['nope'\\].*matched no"):
        TargetSelector(["nope"]).select(model)
    with pytest.raises(TypeError, match="embed_tokens: argument `target_modules` matched a Embedding"):
        TargetSelector(["embed_tokens"]).select(model)
    with pytest.raises(ValueError, match="argument `target_parameters`"):
        ASTConfig(target_parameters="mlp.experts.gate_up_proj")  # PEFT's rule: a list of names/suffixes


def test_target_parameters_select_fused_expert_tensors():
    """MoE: parameter names/suffixes as LoRA's `target_parameters` (AST wraps them: tests/test_moe.py)."""
    mixtral = tiny_model("mixtral")
    params = [n for n, p in mixtral.named_parameters() if p.dim() == 3]
    assert params, "transformers 5 stores Mixtral's experts as fused 3-D parameters"
    found = TargetSelector(target_modules=[], target_parameters=["experts.gate_up_proj"]).select(mixtral)
    assert found.parameters == [n for n in params if n.endswith("experts.gate_up_proj")] and not found.modules
