"""Model cards, the exact Hub upload file set, and the `hf-sparse export` command (no network)."""

from __future__ import annotations

import copy
import json

import torch
from huggingface_hub import ModelCard
from test_export import ast_model, rel_err
from transformers import AutoModelForCausalLM

import hf_sparse
from hf_sparse.cli import main
from hf_sparse.format import FORMAT_VERSION, NMSpec
from hf_sparse.integrations.hub import render_model_card, upload_file_set

CARD = {
    "base_model": "HuggingFaceTB/SmolLM2-135M",
    "recipe": {"method": "ast", "n": 2, "m": 4, "learning_rate": 1e-4, "use_slorb": True},
    "token_budget": 2_000_000,
    "evaluation": [{"metric": "wikitext ppl", "dense": 21.3, "sparse": 24.9}, {"metric": "KL to dense", "dense": None, "sparse": 0.21}],
}


def test_rendered_card_has_every_section():
    spec = NMSpec(bits=4, group_size=128, targets=["a", "b", "c"], slorb={"group_size": 16, "train_projection": False})
    card = render_model_card(spec, None, method="gptq", repo_id="me/smol-2of4", **CARD)
    text = str(card)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert "hf_sparse" in card.data.tags and "int4" in card.data.tags
    for needle in (
        "[HuggingFaceTB/SmolLM2-135M]", "2:4 semi-structured sparse + int4 (group size 128, symmetric)",
        "2:4 along the input dimension of 3 linear layers", "int4, group size 128, symmetric, gptq", "k=16",
        "2,000,000", "learning_rate: 0.0001", "| wikitext ppl | 21.3 | 24.9 |", "| KL to dense |  | 0.21 |",
        'AutoModelForCausalLM.from_pretrained("me/smol-2of4")', "import hf_sparse", f"hf_sparse v{FORMAT_VERSION}",
    ):
        assert needle in text, needle


def test_every_export_carries_a_card_and_upload_set_is_exact(tmp_path):
    out = tmp_path / "e"
    hf_sparse.export(ast_model("llama"), out, bits=8, group_size=32, card=CARD)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M" and "int8" in card.text
    assert json.loads((out / "hf_sparse_recipe.json").read_text())["use_slorb"] is True
    # leftovers that must never be uploaded
    (out / ".lock").write_text("x")
    (out / "checkpoint-10").mkdir()
    (out / "checkpoint-10" / "optimizer.pt").write_bytes(b"0")
    (out / "training_args.bin").write_bytes(b"0")
    (out / "runs").mkdir()
    (out / "runs" / "events.out").write_text("x")
    assert upload_file_set(out) == [
        "README.md", "config.json", "generation_config.json", "hf_sparse_provenance.json", "hf_sparse_recipe.json",
        "model.safetensors",
    ]


def test_cli_export_round_trip(tmp_path, input_ids):
    model = ast_model("llama", slorb=True)
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    rc = main(["export", str(tmp_path / "merged"), str(tmp_path / "out"), "--bits", "4", "--group-size", "32",
               "--asymmetric", "--base-model", "me/base", "--token-budget", "1000"])
    assert rc == 0
    ref = hf_sparse.fake_quantize(copy.deepcopy(model), bits=4, group_size=32, symmetric=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert rel_err(ref(input_ids).logits, loaded(input_ids).logits) <= 1e-5
    assert "me/base" in (tmp_path / "out" / "README.md").read_text()


def test_trainer_push_to_hub_file_set_and_card(tmp_path):
    """An export in a Trainer's output_dir: the card the Trainer would push is ours, the file set is exact."""
    from transformers import Trainer, TrainingArguments

    from hf_sparse.integrations.hub import create_model_card_for_trainer, trainer_upload_file_set

    out = tmp_path / "run"
    hf_sparse.export(ast_model("llama"), out, bits=4, group_size=32, card=CARD)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    from peft import LoraConfig, get_peft_model

    trainer = Trainer(model=get_peft_model(loaded, LoraConfig(r=2, target_modules=["q_proj"])),
                      args=TrainingArguments(output_dir=str(out), report_to=[], include_num_input_tokens_seen=True))
    trainer.state.num_input_tokens_seen = 12345
    (out / "_tmp_upload").write_text("x")  # Trainer ignores "_*"
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "x.safetensors").write_bytes(b"0")
    assert create_model_card_for_trainer(trainer, evaluation=CARD["evaluation"])
    card = ModelCard.load(out / "README.md")
    assert "12,345" in card.text and "| wikitext ppl | 21.3 | 24.9 |" in card.text and "int4" in card.text
    assert trainer_upload_file_set(out) == [
        "README.md", "config.json", "generation_config.json", "hf_sparse_provenance.json", "hf_sparse_recipe.json",
        "model.safetensors",
    ]


def test_cli_gptq_with_calibration_file(tmp_path, input_ids):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(95)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    model = ast_model("llama")
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, 95, (100,), generator=g))
    (tmp_path / "calib.txt").write_text(text)
    assert main(["export", str(tmp_path / "merged"), str(tmp_path / "out"), "--bits", "4", "--group-size", "32",
                 "--method", "gptq", "--calibration-file", str(tmp_path / "calib.txt"), "--calibration-seqlen", "16"]) == 0
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    calib = torch.stack([ids[i : i + 16] for i in range(0, 100 - 16 + 1, 16)])
    ref = hf_sparse.fake_quantize(copy.deepcopy(model), bits=4, group_size=32, method="gptq", calibration_data=calib)
    rtn = hf_sparse.fake_quantize(copy.deepcopy(model), bits=4, group_size=32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        got = loaded(input_ids).logits
        assert rel_err(ref(input_ids).logits, got) <= 1e-5
        assert rel_err(rtn(input_ids).logits, got) > 1e-4  # GPTQ really ran (differs from RTN)
