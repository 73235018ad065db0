"""Tiny real transformers models built from configs (no network)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU; must precede `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The suite checks the format against the exact fp32 dequantized reference: torch's CPU low-bit kernels (bf16,
# chosen by measurement) are tested on their own in tests/test_cpu_kernels.py, which turns them on.
os.environ.setdefault("HF_SPARSE_CPU_KERNELS", "0")
# no test reads or writes the user's autotune cache
import tempfile  # noqa: E402

os.environ.setdefault("HF_SPARSE_CACHE_DIR", tempfile.mkdtemp(prefix="hf-sparse-test-cache-"))

import transformers  # noqa: E402  (imports triton)

import hf_sparse  # noqa: F401  (registers AST with PEFT)

VOCAB = 96


def tiny_config(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    if arch == "llama":
        return transformers.LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common)
    if arch == "mistral":
        return transformers.MistralConfig(intermediate_size=128, num_key_value_heads=2, **common)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=2, n_positions=128)
    if arch == "opt":
        return transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=128,
            word_embed_proj_dim=64, max_position_embeddings=128,
        )
    if arch == "mixtral":
        return transformers.MixtralConfig(
            intermediate_size=128, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **common
        )
    raise KeyError(arch)


def tiny_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch))
    return model.eval()


ARCHS = ["llama", "qwen2", "mistral", "gpt2", "opt", "mixtral"]


@pytest.fixture
def input_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 12), generator=g)
