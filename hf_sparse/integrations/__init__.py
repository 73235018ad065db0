"""Hooks into the Hugging Face libraries: transformers' quantizer registry, the Hub, compressed-tensors."""
