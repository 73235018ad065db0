"""Inference kernels for packed N:M weights: dense fallback, torch semi-structured 2:4, and Triton W4A16 x 2:4."""
