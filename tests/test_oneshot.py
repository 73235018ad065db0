"""One-shot N:M pruning (magnitude, Wanda, SparseGPT) on tiny real models, and its use as AST's initial mask."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from conftest import VOCAB, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM, default_data_collator
from transformers.pytorch_utils import Conv1D

from hf_sparse import ASTConfig
from hf_sparse.oneshot import (
    PRUNERS,
    WandaPruner,
    as_batches,
    calibration_ids_from_text,
    get_pruner,
    prune_oneshot,
    register_pruner,
    select_targets,
)
from hf_sparse.sparsity.nm import input_dim_of, nm_violations
from hf_sparse.training import ASTOneShotInitCallback, ast_masks_need_init, initialize_ast_masks
from hf_sparse.tuners.ast import find_ast_model

METHODS = ["magnitude", "wanda", "sparsegpt"]


def _ids(num: int = 4, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (num, seq), generator=torch.Generator().manual_seed(seed))


# ---- every method, several architectures: exact N:M on every AST target, nothing else touched ----
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "qwen2", "mistral", "mixtral"])
@pytest.mark.parametrize("method", METHODS)
def test_exact_nm_on_all_targets(arch, method):
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = prune_oneshot(model, method, None if method == "magnitude" else _ids(), batch_size=2, progress=False)
    modules = dict(model.named_modules())
    ast = peft.get_peft_model(tiny_model(arch), ASTConfig())
    assert set(masks) == {name for name, _ in find_ast_model(ast)[0].ast_layers()}  # AST's targets exactly
    for name, mask in masks.items():
        module = modules[name]
        dim = input_dim_of(module)
        assert mask.dtype == torch.bool and mask.shape == module.weight.shape
        assert nm_violations(mask, 2, 4, dim=dim) == 0 and int(mask.sum()) * 2 == mask.numel()  # exactly 2 of 4
        assert nm_violations(module.weight, 2, 4, dim=dim) == 0
        assert bool((module.weight[~mask] == 0).all())
        if method != "sparsegpt":  # no weight update: kept weights are the originals
            torch.testing.assert_close(module.weight[mask], before[f"{name}.weight"][mask])
    touched = {f"{name}.weight" for name in masks}
    for key, value in model.state_dict().items():
        if key not in touched:
            torch.testing.assert_close(value, before[key], msg=key)  # embeddings, lm_head, norms, routers
    assert torch.isfinite(model(_ids(1)).logits).all()


# ---- one layer, correlated inputs: SparseGPT < Wanda < magnitude in reconstruction error ----
def _correlated_inputs(tokens: int = 2048, d: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, 8, generator=g)
    mix = torch.randn(8, d, generator=g)
    scales = torch.logspace(-1, 1, d)[torch.randperm(d, generator=g)]  # channels of different loudness
    return (z @ mix + 0.1 * torch.randn(tokens, d, generator=g)) * scales


def _prune_one(layer: nn.Module, method: str, x: torch.Tensor) -> torch.Tensor:
    pruner = get_pruner(method)(layer, "layer", 2, 4)
    for chunk in x.split(512):
        pruner.add_batch(chunk.reshape(2, -1, x.shape[-1]))  # batched 3-D inputs, like inside a model
    return pruner.prune()


def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude():
    torch.manual_seed(0)
    dense = nn.Linear(64, 48, bias=False)
    x = _correlated_inputs()
    errors = {}
    for method in METHODS:
        layer = copy.deepcopy(dense)
        mask = _prune_one(layer, method, x)
        assert nm_violations(layer.weight, 2, 4) == 0 and int(mask.sum()) * 2 == mask.numel()
        with torch.no_grad():
            errors[method] = float(torch.linalg.norm(x @ dense.weight.T - x @ layer.weight.T))
    print("reconstruction errors", errors)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < 0.9 * errors["wanda"], errors


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_conv1d_is_pruned_along_its_input_dim(method):
    """GPT-2's Conv1D stores [in, out]: it must get the same result as the equivalent nn.Linear, transposed."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    conv = Conv1D(32, 64)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    x = _correlated_inputs(512)
    mask_linear = _prune_one(linear, method, x)
    mask_conv = _prune_one(conv, method, x)
    assert torch.equal(mask_conv, mask_linear.T)
    torch.testing.assert_close(conv.weight, linear.weight.T, rtol=1e-5, atol=1e-6)
    assert nm_violations(conv.weight, 2, 4, dim=0) == 0


def test_wanda_picks_differently_from_magnitude_when_input_scales_differ():
    """Channel 0 of every group has the smallest |W| but a 100x louder input: Wanda keeps it, magnitude drops it."""
    torch.manual_seed(0)
    weight = torch.randn(16, 32).abs() + 1.0
    weight[:, 0::4] = 0.5
    x = torch.randn(256, 32)
    x[:, 0::4] *= 100.0
    masks = {}
    for method in ("magnitude", "wanda"):
        layer = nn.Linear(32, 16, bias=False)
        with torch.no_grad():
            layer.weight.copy_(weight)
        masks[method] = _prune_one(layer, method, x)
    assert not bool(masks["magnitude"][:, 0::4].any())
    assert bool(masks["wanda"][:, 0::4].all())


# ---- sequential: layer 1 is calibrated on the outputs of the pruned layer 0 ----
@register_pruner("test-recording-wanda")
class _RecordingWanda(WandaPruner):
    seen: dict[str, list[torch.Tensor]] = {}

    def add_batch(self, x: torch.Tensor) -> None:
        self.seen.setdefault(self.name, []).append(x.detach().clone())
        super().add_batch(x)


def test_layer1_statistics_come_from_pruned_layer0_outputs():
    try:
        model = tiny_model("llama")
        dense = copy.deepcopy(model)
        ids = _ids(4, 16)
        _RecordingWanda.seen = {}
        prune_oneshot(model, "test-recording-wanda", ids, batch_size=2, progress=False)
        name = "model.layers.1.self_attn.q_proj"  # its input depends on layer 0 only (through input_layernorm)

        def inputs_of(m: nn.Module, target: str) -> torch.Tensor:
            got = []
            handle = dict(m.named_modules())[target].register_forward_hook(lambda mod, i, o: got.append(i[0]))
            with torch.no_grad():
                for batch in ids.split(2):
                    m(batch)
            handle.remove()
            return torch.cat(got)

        seen = torch.cat(_RecordingWanda.seen[name])
        torch.testing.assert_close(seen, inputs_of(model, name), rtol=1e-5, atol=1e-5)  # = inputs in the pruned model
        assert not torch.allclose(seen, inputs_of(dense, name), atol=1e-3)  # != inputs in the dense model
        first = "model.layers.0.self_attn.q_proj"  # layer 0 sees the (dense) embeddings, the same in both models
        torch.testing.assert_close(torch.cat(_RecordingWanda.seen[first]), inputs_of(dense, first))
    finally:
        PRUNERS.pop("test-recording-wanda", None)


def test_sequential_differs_from_dense_calibration():
    """Wanda with layer-1 norms from dense activations would choose other layer-1 masks on this model."""
    model = tiny_model("llama")
    ids = _ids(4, 16)
    sequential = prune_oneshot(copy.deepcopy(model), "wanda", ids, batch_size=2, progress=False)
    # non-sequential: every target's norms from ONE pass through the dense model
    sq: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    def record(module, inputs, output, name):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        sq[name] = sq.get(name, 0) + x.pow(2).sum(0)

    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: record(m, i, o, n)) for n in sequential]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    from hf_sparse import nm_mask

    one_pass = {n: nm_mask(modules[n].weight.abs() * sq[n].sqrt(), 2, 4) for n in sequential}
    layer0 = [n for n in sequential if ".layers.0." in n]
    layer1 = [n for n in sequential if ".layers.1." in n]
    assert all(torch.equal(sequential[n], one_pass[n]) for n in layer0 if "q_proj" in n)
    assert any(not torch.equal(sequential[n], one_pass[n]) for n in layer1)


# ---- calibration and errors ----
def test_as_batches_shapes():
    assert [b.shape for b in as_batches(_ids(5, 8), 2)] == [(2, 8), (2, 8), (1, 8)]
    rows = [torch.arange(8), torch.arange(8), torch.arange(5)]
    assert [b.shape for b in as_batches(rows, 4)] == [(2, 8), (1, 5)]
    with pytest.raises(TypeError, match="integer token ids"):
        as_batches(torch.randn(2, 4))


def test_errors_name_the_argument():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="`method`='obs'.*magnitude"):
        prune_oneshot(model, "obs", _ids())
    with pytest.raises(ValueError, match="calibration_ids"):
        prune_oneshot(model, "wanda", None)
    with pytest.raises(ValueError, match="target_modules"):
        prune_oneshot(model, "wanda", _ids(), target_modules=["lm_head"])
    with pytest.raises(ValueError, match="not divisible by argument `m`"):
        prune_oneshot(model, "magnitude", None, n=2, m=5)


def test_target_selection_arguments():
    model = tiny_model("llama")
    only_mlp = select_targets(model, target_modules=["gate_proj", "up_proj", "down_proj"])
    assert len(only_mlp) == 6 and all(".mlp." in n for n in only_mlp)
    masks = prune_oneshot(model, "sparsegpt", _ids(), exclude_modules=[r".*\.layers\.1\..*"], progress=False)
    assert masks and all(".layers.0." in n for n in masks)
    assert nm_violations(model.model.layers[1].mlp.down_proj.weight, 2, 4) > 0  # layer 1 stayed dense


# ---- CLI: prune a saved tiny model, reload it with from_pretrained ----
def _char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"\n": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=" ", eos_token="\n")


@pytest.mark.parametrize("arch,method", [("llama", "sparsegpt"), ("gpt2", "wanda")])
def test_cli_prunes_and_saves_a_loadable_model(tmp_path, arch, method):
    from hf_sparse.cli import main

    src, out = tmp_path / "dense", tmp_path / "pruned"
    tiny_model(arch).save_pretrained(src)
    _char_tokenizer().save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text(open("tests/data/hamlet_act1.txt", encoding="utf-8").read()[:4000], encoding="utf-8")
    argv = ["prune", "--method", method, "--model", str(src), "--output-dir", str(out), "--calibration-file",
            str(text), "--num-samples", "4", "--seq-len", "32", "--batch-size", "2", "--device", "cpu"]
    assert main(argv) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    targets = select_targets(reloaded)
    assert targets and all(nm_violations(m.weight, 2, 4, dim=input_dim_of(m)) == 0 for m in targets.values())
    assert all(int((m.weight != 0).sum()) * 2 <= m.weight.numel() for m in targets.values())
    report = json.loads((out / "hf_sparse_oneshot.json").read_text())
    assert report["method"] == method and report["num_targets"] == len(targets) and report["calibration_sequences"] == 4
    assert (out / "tokenizer.json").is_file()
    # re-running replaces the earlier output atomically (no leftovers beside it)
    assert main(argv[:2] + ["magnitude"] + argv[3:]) == 0
    assert json.loads((out / "hf_sparse_oneshot.json").read_text())["method"] == "magnitude"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "dense", "pruned"]


def test_cli_accepts_token_id_file(tmp_path):
    from hf_sparse.cli import main

    src, out = tmp_path / "dense", tmp_path / "pruned"
    tiny_model("opt").save_pretrained(src)
    _char_tokenizer().save_pretrained(src)
    from safetensors.torch import save_file

    save_file({"input_ids": _ids(3, 16)}, str(tmp_path / "ids.safetensors"))
    argv = ["prune", "--method", "wanda", "--model", str(src), "--output-dir", str(out),
            "--calibration-ids-file", str(tmp_path / "ids.safetensors"), "--device", "cpu"]
    assert main(argv) == 0
    assert json.loads((out / "hf_sparse_oneshot.json").read_text())["calibration_sequences"] == 3


def test_calibration_ids_from_text_are_windows():
    tok = _char_tokenizer()
    ids = calibration_ids_from_text(tok, ["abcdefghij" * 10], num_samples=3, seq_len=8, seed=1)
    assert ids.shape == (3, 8)
    full = tok("abcdefghij" * 10, add_special_tokens=False)["input_ids"]
    for row in ids.tolist():
        assert any(full[s : s + 8] == row for s in range(len(full) - 7))
    with pytest.raises(ValueError, match="seq_len"):
        calibration_ids_from_text(tok, ["short"], seq_len=32)


# ---- AST initialiser ----
@pytest.mark.parametrize("arch,method", [("llama", "wanda"), ("llama", "sparsegpt"), ("gpt2", "sparsegpt")])
def test_initialize_ast_masks_equals_oneshot(arch, method):
    model = tiny_model(arch)
    ids = _ids(4, 16)
    reference = copy.deepcopy(model)
    expected = prune_oneshot(reference, method, ids, batch_size=2, progress=False)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    ast = peft.get_peft_model(model, ASTConfig(mask_init=method, use_slorb=True, slorb_group_size=16))
    masks = initialize_ast_masks(ast, method, ids, batch_size=2, progress=False)
    ref_modules = dict(reference.named_modules())
    ast_model, _ = find_ast_model(ast)
    for name, layer in ast_model.ast_layers():
        assert torch.equal(masks[name], expected[name])
        assert torch.equal(layer.ast_mask["default"], expected[name])
        assert torch.equal(layer.ast_initial_mask["default"], expected[name])
        weight, mask = layer.get_base_layer().weight, expected[name]
        original = dense[f"{name}.weight"]
        torch.testing.assert_close(weight[~mask], original[~mask])  # pruned values kept for the STE
        if method == "wanda":
            torch.testing.assert_close(weight, original)
        else:  # kept entries carry SparseGPT's update
            torch.testing.assert_close(weight[mask], ref_modules[name].weight[mask])
        slorb = layer.ast_slorb["default"]
        from hf_sparse.modules import slorb_mean_init

        torch.testing.assert_close(slorb.weight, slorb_mean_init(layer._out_in(weight), layer._out_in(mask), 16))
    # the AST model now computes exactly what the one-shot pruned model computes (SLoRB off)
    with torch.no_grad():
        for _, layer in ast_model.ast_layers():
            layer.ast_slorb["default"].weight.zero_()
        torch.testing.assert_close(ast(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trainer_kind", ["ast", "plain"])
def test_ast_trainer_starts_from_the_wanda_mask(tmp_path, trainer_kind):
    from test_training_utils import ast_args, hamlet_blocks, pretrained_tiny
    from transformers import Trainer

    from hf_sparse import ASTTrainer, add_ast_callbacks

    data = hamlet_blocks(32, max_blocks=8)
    model = pretrained_tiny("llama", steps=20)
    reference = peft.get_peft_model(copy.deepcopy(model), ASTConfig(mask_init="wanda"))
    calib = torch.stack([data[i]["input_ids"] for i in range(len(data))])
    expected = initialize_ast_masks(reference, "wanda", calib, batch_size=8, progress=False)
    magnitude = {n: l.ast_mask["default"].clone() for n, l in find_ast_model(
        peft.get_peft_model(copy.deepcopy(model), ASTConfig()))[0].ast_layers()}
    args = ast_args(tmp_path, max_steps=2, ast_plot=False, ast_calibration_samples=8)
    if trainer_kind == "ast":
        trainer = ASTTrainer(model=model, args=args, ast_config=ASTConfig(mask_init="wanda"), train_dataset=data,
                             data_collator=default_data_collator)
    else:  # a plain Trainer on an AST PEFT model with the public callbacks
        trainer = Trainer(model=peft.get_peft_model(model, ASTConfig(mask_init="wanda")), args=args,
                          train_dataset=data, data_collator=default_data_collator)
        add_ast_callbacks(trainer, plot=False)
    assert isinstance(trainer.callback_handler.callbacks[0], ASTOneShotInitCallback)
    trainer.train()
    ast_model, _ = find_ast_model(trainer.model)
    differs = 0
    for name, layer in ast_model.ast_layers():
        assert torch.equal(layer.ast_initial_mask["default"], expected[name])
        assert torch.equal(layer.ast_mask["default"], expected[name])  # no recompute within 2 steps
        differs += int(not torch.equal(expected[name], magnitude[name]))
    assert differs > 0  # the Wanda mask is not the magnitude mask the wrapper started from


def test_init_callback_skips_on_resume_and_when_done():
    from transformers import TrainerControl, TrainerState

    model = peft.get_peft_model(tiny_model("llama"), ASTConfig(mask_init="wanda"))
    ast_model, _ = find_ast_model(model)
    before = {n: l.ast_mask["default"].clone() for n, l in ast_model.ast_layers()}
    callback = ASTOneShotInitCallback()
    state = TrainerState()
    state.global_step = 5  # resumed: masks came from the checkpoint
    callback.on_train_begin(None, state, TrainerControl(), model=model, train_dataloader=None)
    assert all(torch.equal(l.ast_mask["default"], before[n]) for n, l in ast_model.ast_layers())
    initialize_ast_masks(model, "wanda", _ids(), progress=False)
    done = {n: l.ast_mask["default"].clone() for n, l in ast_model.ast_layers()}
    callback.on_train_begin(None, TrainerState(), TrainerControl(), model=model, train_dataloader=None)  # no error:
    assert all(torch.equal(l.ast_mask["default"], done[n]) for n, l in ast_model.ast_layers())  # already done


def test_init_callback_keeps_masks_loaded_from_a_trained_adapter():
    """A fresh process loading a trained adapter has no in-memory marker: its non-magnitude masks must survive."""
    from transformers import TrainerControl, TrainerState

    model = peft.get_peft_model(tiny_model("llama"), ASTConfig(mask_init="wanda"))
    initialize_ast_masks(model, "wanda", _ids(), progress=False)
    ast_model, _ = find_ast_model(model)
    delattr(ast_model, "_hf_sparse_mask_init_done")  # as after PeftModel.from_pretrained
    loaded = {n: l.ast_mask["default"].clone() for n, l in ast_model.ast_layers()}
    with torch.no_grad():
        for _, layer in ast_model.ast_layers():
            weight = layer.get_base_layer().weight
            weight.add_(torch.randn_like(weight) * weight.std())  # "trained" weights: a re-init would pick others
    ASTOneShotInitCallback().on_train_begin(None, TrainerState(), TrainerControl(), model=model, train_dataloader=None)
    assert all(torch.equal(l.ast_mask["default"], loaded[n]) for n, l in ast_model.ast_layers())
    with pytest.raises(ValueError, match="mask_init"):
        ast_masks_need_init(peft.get_peft_model(tiny_model("llama"), ASTConfig(mask_init="obs")))


def test_mask_init_leaves_adapters_enabled_and_trainability_unchanged():
    """The init runs the layers dense through PEFT's disable/enable_adapter_layers and restores requires_grad."""
    model = peft.get_peft_model(tiny_model("llama"), ASTConfig(use_slorb=True, slorb_group_size=16))
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    initialize_ast_masks(model, "wanda", _ids(), progress=False)
    ast_model, _ = find_ast_model(model)
    assert all(not layer.disable_adapters for _, layer in ast_model.ast_layers())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
