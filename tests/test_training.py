"""End-to-end ASTTrainer runs on real text with tiny real models (CPU, a few dozen steps)."""

from __future__ import annotations

import os
import struct
import zlib

import pytest
import torch
from conftest import tiny_model
from test_training_utils import ast_args, hamlet_blocks, pretrained_tiny
from transformers import Trainer, TrainerCallback, default_data_collator

from hf_sparse import ASTConfig, ASTTrainer, is_nm_sparse
from hf_sparse.training import ASTMaskCallback, NonFiniteLossError, add_ast_callbacks
from hf_sparse.training.callbacks import PLOT_FILE, find_ast_model


class MaskChecker(TrainerCallback):
    """Runs after the AST callback: after each recompute every target mask and effective weight must be N:M."""

    def __init__(self, interval: int):
        self.interval, self.checked = interval, 0

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if (state.global_step + 1) % self.interval:
            return
        ast_model, cfg = find_ast_model(model)
        for name, layer in ast_model.ast_layers():
            mask = layer.ast_mask["default"]
            assert mask.dtype == torch.bool
            assert is_nm_sparse(mask, cfg.n, cfg.m, dim=layer.input_dim), name
            assert int(mask.sum()) * cfg.m == mask.numel() * cfg.n, name  # exactly N of every M
            eff = layer.effective_weight().detach()
            assert is_nm_sparse(eff, cfg.n, cfg.m, dim=layer.input_dim), name
        self.checked += 1


def _png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    assert zlib.crc32(data[12 : 16 + length]) == struct.unpack(">I", data[16 + length : 20 + length])[0]
    return struct.unpack(">II", data[16:24])


def test_ast_trainer_on_real_text(tmp_path):
    model = pretrained_tiny("llama")
    teacher = pretrained_tiny("llama")
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    interval = 5
    config = ASTConfig(mask_update_interval=interval, masked_decay_peak=0.05, masked_decay_ramp_steps=20)
    checker = MaskChecker(interval)
    args = ast_args(tmp_path, max_steps=40, save_strategy="steps", save_steps=20, distill_alpha=0.5)
    trainer = ASTTrainer(
        model=model, args=args, teacher_model=teacher, ast_config=config,
        train_dataset=hamlet_blocks(64), data_collator=default_data_collator, callbacks=[checker],
    )
    # the teacher stays outside the optimized/saved model
    opt_params = {id(p) for g in trainer.create_optimizer().param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in teacher.parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]

    # loss falls (the mask costs a jump at step 0; training recovers from it)
    assert sum(h["loss"] for h in logs[-2:]) < sum(h["loss"] for h in logs[:2])
    assert logs[-1]["ce_loss"] < logs[0]["ce_loss"]
    # masks exactly N:M after every recompute
    assert checker.checked == 40 // interval
    # flip rates and λ logged; λ ramps to its peak
    assert all("ast/flip_rate" in h and "ast/flip_rate_vs_initial" in h for h in logs[2:])
    lams = [h["ast/lambda"] for h in logs]
    assert lams[0] < lams[3] == pytest.approx(0.05)
    # pruned weights shrink as λ ramps; kept weights are not decayed (their norm does not fall)
    pruned = [h["ast/pruned_weight_norm"] for h in logs]
    kept = [h["ast/kept_weight_norm"] for h in logs]
    assert pruned[-1] < 0.5 * pruned[0]
    assert all(b < a for a, b in zip(pruned[1:], pruned[2:]))
    assert kept[-1] > 0.95 * kept[0]
    # teacher unchanged, still frozen
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k], rtol=0, atol=0)
    assert not any(p.requires_grad for p in teacher.parameters())
    # checkpoints hold the student only (no teacher copy), the AST state and the plot is a valid PNG
    ckpt = tmp_path / "checkpoint-40"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "ast_state.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(ckpt / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    n_targets = sum(1 for _ in find_ast_model(trainer.model)[0].ast_layers())
    assert sum(k.endswith("base_layer.weight") for k in keys) == n_targets
    assert not any("teacher" in k for k in keys)
    width, height = _png_size(str(tmp_path / PLOT_FILE))
    assert width > 100 and height > 100


def test_plain_model_is_wrapped_and_teacher_is_dense_copy(tmp_path):
    model = pretrained_tiny("gpt2")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = ASTTrainer(
        model=model, args=ast_args(tmp_path, max_steps=3, ast_plot=False),
        train_dataset=hamlet_blocks(32), data_collator=default_data_collator,
    )
    ast_model, cfg = find_ast_model(trainer.model)
    assert cfg == ASTConfig() or (cfg.n, cfg.m) == (2, 4)
    assert sum(1 for _ in ast_model.ast_layers()) == 8  # c_attn, c_proj, c_fc, mlp.c_proj x 2 blocks
    teacher = trainer.teacher_model
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    for k, v in teacher.state_dict().items():  # the dense weights from before wrapping
        torch.testing.assert_close(v, dense[k])
    trainer.train()
    metrics = trainer.evaluate(hamlet_blocks(32, max_blocks=8))
    # eval loss is the student's CE: equals a direct computation
    batch = torch.stack([hamlet_blocks(32, max_blocks=8)[i]["input_ids"] for i in range(8)])
    with torch.no_grad():
        ce = trainer.model(input_ids=batch, labels=batch).loss
    assert metrics["eval_loss"] == pytest.approx(float(ce), rel=1e-4)


def test_gradient_accumulation_matches_full_batch(tmp_path):
    """Same update from 1×4 sequences and 2×2 with GA, even when micro-batches hold different token counts."""
    blocks = hamlet_blocks(24, max_blocks=4)
    items = [blocks[i] for i in range(4)]
    for i, n_pad in enumerate([0, 10, 0, 3]):  # padded tails: attention 0 (labels left unmasked on purpose)
        if n_pad:
            items[i]["attention_mask"][-n_pad:] = 0

    class Fixed(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return items[i]

    results = []
    for bs, ga in [(4, 1), (2, 2)]:
        model = pretrained_tiny("llama")
        args = ast_args(
            tmp_path / f"bs{bs}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1,
            ast_plot=False, max_grad_norm=0.0,
        )
        trainer = ASTTrainer(
            model=model, args=args, train_dataset=Fixed(), data_collator=default_data_collator,
            optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 1.0}),
        )
        trainer.train()
        results.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-4, atol=1e-6)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 7:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))

    args = ast_args(tmp_path, max_steps=20, save_strategy="steps", save_steps=5, ast_plot=False)
    trainer = ASTTrainer(
        model=tiny_model("llama"), args=args, train_dataset=hamlet_blocks(32),
        data_collator=default_data_collator, callbacks=[Poison()],
    )
    with pytest.raises(NonFiniteLossError, match=r"step 8.*checkpoint-5"):
        trainer.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-5"]
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "checkpoint-5" / "adapter_model.safetensors"))
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def test_callbacks_with_plain_trainer(tmp_path):
    """The callbacks drive a plain Trainer: decay goes through the gradient, masks recompute, metrics are logged."""
    import peft

    model = peft.get_peft_model(pretrained_tiny("llama"), ASTConfig(mask_update_interval=4, masked_decay_ramp_steps=4))
    args = ast_args(tmp_path, max_steps=12, logging_steps=4, report_to=["tensorboard"])
    trainer = Trainer(model=model, args=args, train_dataset=hamlet_blocks(32), data_collator=default_data_collator)
    callback = add_ast_callbacks(trainer)
    # one-shot init first (a no-op for mask_init="magnitude"), then the mask callback, then the reporters
    assert isinstance(trainer.callback_handler.callbacks[1], ASTMaskCallback)
    trainer.train()
    assert callback.num_recomputes == 3 and not callback._uses_optimizer_decay
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["ast/lambda"] == pytest.approx(1e-4) and "ast/flip_rate" in logs[-1]
    assert (tmp_path / PLOT_FILE).is_file()
    # tensorboard got the AST scalars through the Trainer's own log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dirs = [os.path.join(r, "") for r, _, files in os.walk(tmp_path) if any("tfevents" in f for f in files)]
    acc = EventAccumulator(run_dirs[0])
    acc.Reload()
    assert "train/ast/flip_rate" in acc.Tags()["scalars"]


def test_activation_score_recompute_uses_input_norms(tmp_path):
    """mask_score='activation': a channel with huge inputs is kept in every group, whatever its |W|."""
    import peft

    model = peft.get_peft_model(tiny_model("llama"), ASTConfig(mask_score="activation", target_modules=["down_proj"]))
    ast_model, _ = find_ast_model(model)
    callback = ASTMaskCallback()
    from transformers import TrainerControl, TrainerState

    state = TrainerState(max_steps=10)
    callback.on_train_begin(ast_args(tmp_path), state, TrainerControl(), model=model, optimizer=None)
    name, layer = next(ast_model.ast_layers())
    with torch.no_grad():
        layer.get_base_layer().weight[:, 0::4] = 1e-4  # channel 0 of each group: tiny |W|
    from hf_sparse import nm_mask

    assert not bool(nm_mask(layer.get_base_layer().weight.abs(), 2, 4)[:, 0::4].any())  # magnitude drops them
    model.train()
    x = torch.randn(4, 7, layer.in_features)
    x[..., 0::4] *= 1e4
    layer(x)
    state.global_step = 9  # step 10 is a recompute step (interval 10)
    callback.on_optimizer_step(ast_args(tmp_path), state, TrainerControl())
    assert callback.num_recomputes == 1
    assert bool(layer.ast_mask["default"][:, 0::4].all())
    callback.on_train_end(None, state, TrainerControl())
    assert not layer._forward_pre_hooks


def test_push_to_hub_card_is_ours(tmp_path):
    """``Trainer.push_to_hub`` writes its card through ``create_model_card``: ASTTrainer keeps hf_sparse's card
    for an export in ``output_dir`` and tags the Trainer's generic card otherwise."""
    from huggingface_hub import ModelCard
    from test_export import ast_model

    import hf_sparse

    plain = ASTTrainer(model=tiny_model("llama"), args=ast_args(tmp_path / "plain", max_steps=1))
    plain.create_model_card(model_name="tiny-ast")
    card = ModelCard.load(tmp_path / "plain" / "README.md")
    assert {"hf_sparse", "2:4-sparse", "ast"} <= set(card.data.tags)

    out = tmp_path / "exported"
    hf_sparse.export(ast_model("llama"), out, bits=4, group_size=32)
    trainer = ASTTrainer(model=tiny_model("llama"), args=ast_args(out, max_steps=1))
    trainer.create_model_card(model_name="tiny-ast")
    text = (out / "README.md").read_text()
    assert "int4" in text and "2:4" in text


def test_activation_norms_accumulate_exactly_with_shared_inputs(tmp_path, input_ids):
    """q/k/v share one input tensor (reduced once): every layer still gets its own exact Σx² over all forwards."""
    import peft
    from transformers import TrainerControl, TrainerState

    model = peft.get_peft_model(tiny_model("llama"), ASTConfig(mask_score="activation"))
    ast_model, _ = find_ast_model(model)
    callback = ASTMaskCallback()
    callback.on_train_begin(ast_args(tmp_path), TrainerState(max_steps=10), TrainerControl(), model=model, optimizer=None)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in ast_model.ast_layers():
        def record(module, inputs, name=name):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            seen[name] = seen.get(name, 0) + x.pow(2).sum(0)
        handles.append(layer.register_forward_pre_hook(record))
    model.train()
    model(input_ids)
    model(input_ids.flip(0))
    for h in handles:
        h.remove()
    assert set(callback._input_sq) == set(seen) and len(seen) >= 7
    for name, expected in seen.items():
        torch.testing.assert_close(callback._input_sq[name], expected, rtol=1e-6, atol=1e-6)
    callback.on_train_end(None, TrainerState(), TrainerControl())


def test_teacher_logits_ignore_an_all_ones_mask_but_honour_padding(tmp_path, input_ids):
    """The teacher skips an all-ones attention mask (causal fast path); a real padding mask still reaches it."""
    trainer = ASTTrainer(model=tiny_model("llama"), args=ast_args(tmp_path, max_steps=1))
    teacher = trainer.teacher_model
    ones = torch.ones_like(input_ids)
    with torch.no_grad():
        expected = teacher(input_ids=input_ids, attention_mask=ones).logits
        padded_mask = ones.clone()
        padded_mask[0, :3] = 0  # left padding
        expected_padded = teacher(input_ids=input_ids, attention_mask=padded_mask).logits
    torch.testing.assert_close(trainer._teacher_logits({"input_ids": input_ids, "attention_mask": ones}), expected)
    got = trainer._teacher_logits({"input_ids": input_ids, "attention_mask": padded_mask})
    torch.testing.assert_close(got, expected_padded)
    assert not torch.allclose(got[0, 3:], expected[0, 3:])  # the padding mask did change the teacher's view
