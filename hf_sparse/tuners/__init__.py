"""PEFT-style tuners of hf_sparse (AST) and sparsity-aware helpers for other PEFT methods."""
