"""Shared helpers for the training tests (no tests here): real text, a briefly pretrained tiny teacher."""

from __future__ import annotations

import copy
import os
from functools import lru_cache

import torch
from conftest import tiny_model

from hf_sparse.training import ASTTrainingArguments
from hf_sparse.training.data import CharTokenizer, TextBlocks

TEXT = os.path.join(os.path.dirname(__file__), "data", "hamlet_act1.txt")


def text_ids() -> list[int]:
    with open(TEXT, encoding="utf-8") as f:
        return CharTokenizer().encode(f.read())


def hamlet_blocks(block_size: int = 64, max_blocks: int | None = None) -> TextBlocks:
    return TextBlocks(text_ids(), block_size, max_blocks)


@lru_cache(maxsize=None)
def _pretrained(arch: str, steps: int) -> dict[str, torch.Tensor]:
    """A dense tiny model trained briefly on the text, so it is a teacher worth distilling from."""
    model = tiny_model(arch).train()
    data = hamlet_blocks(64).blocks
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = data[torch.randint(0, data.shape[0], (8,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pretrained_tiny(arch: str = "llama", steps: int = 120) -> torch.nn.Module:
    model = tiny_model(arch)
    model.load_state_dict(copy.deepcopy(_pretrained(arch, steps)))
    return model


def ast_args(output_dir, **overrides) -> ASTTrainingArguments:
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        max_steps=40,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    kwargs.update(overrides)
    return ASTTrainingArguments(**kwargs)
