"""hf_sparse: 2:4 semi-structured sparsity for Hugging Face causal LMs with the Adaptive Sparse Trainer (AST).

``import hf_sparse`` registers AST with PEFT (``peft.get_peft_model(model, hf_sparse.ASTConfig())``).
"""

from .sparsity import is_nm_sparse, nm_mask
from .tuners.ast import ASTConfig, ASTModel, register_ast_with_peft
from .tuners.masked_lora_merge import merge_lora_keep_mask
from .exporters import export, fake_quantize
from .quantization.config import HfSparseConfig
from .integrations.transformers_quantizer import register_with_transformers

register_ast_with_peft()
register_with_transformers()  # AutoModelForCausalLM.from_pretrained loads hf_sparse exports

__version__ = "0.2.0"

# Training names import transformers.Trainer: loaded on first use so `import hf_sparse` stays light.
_TRAINING_NAMES = (
    "ASTTrainer",
    "ASTTrainingArguments",
    "ASTMaskCallback",
    "ASTPlotCallback",
    "MaskedDecayAdamW",
    "NonFiniteLossError",
    "add_ast_callbacks",
)


def __getattr__(name: str):
    if name in _TRAINING_NAMES:
        from . import training

        return getattr(training, name)
    if name == "prune_oneshot":  # one-shot baselines (magnitude, Wanda, SparseGPT)
        from .oneshot import prune_oneshot

        return prune_oneshot
    raise AttributeError(f"module 'hf_sparse' has no attribute {name!r}")


__all__ = [
    *_TRAINING_NAMES,
    "ASTConfig",
    "ASTModel",
    "HfSparseConfig",
    "export",
    "fake_quantize",
    "is_nm_sparse",
    "merge_lora_keep_mask",
    "nm_mask",
    "prune_oneshot",
]
