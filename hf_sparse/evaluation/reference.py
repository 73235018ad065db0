"""The reference (dense) model's distributions, computed once and cached: :class:`ReferenceLogprobs`.

Running the dense model once per compared model is wasteful, so :func:`reference_logprobs` precomputes the
reference's distributions once into a :class:`ReferenceLogprobs` cache (saved/loaded as safetensors).
Full-vocabulary log-probs are ``tokens x vocab`` floats (SmolLM2: 49152 x 4 bytes = 192 KiB per token), so by
default the cache keeps the reference's **top-k** tokens per position (8 bytes each) plus the remaining mass
as one "rest" bucket. KL on that coarsened distribution is a lower bound of the exact KL (data processing
inequality). Measured on SmolLM2-135M-Instruct, 3000 held-out Shakespeare tokens, share of the exact KL
recovered:

=========================  ========  ======  ======  ======
compared model             exact KL  k=256   k=1024  k=4096
=========================  ========  ======  ======  ======
one-shot magnitude 2:4     3.547     0.925   0.972   0.994
magnitude 3:4 on MLPs      0.488     0.913   0.967   0.993
=========================  ========  ======  ======  ======

So the default ``top_k=1024`` (8 KiB per token) reads about 3% low, the same way for every model (fine for
ranking); ``top_k=4096`` (32 KiB per token) is within 1%. For final numbers give
:func:`~hf_sparse.evaluation.kl_to_reference` the reference *model*: both run window by window, exact, no
storage, one extra forward per window. ``top_k=None`` stores full distributions (exact, 192 KiB per token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .windows import DeviceLike, _as_stream, _EvalMode, _prepare, _window_logits

__all__ = ["ReferenceLogprobs", "reference_logprobs"]


@dataclass
class ReferenceLogprobs:
    """The reference model's next-token log-probs at every scored position of one token stream.

    ``token_ids`` is ``None`` when the full vocabulary is stored (``logprobs``: [tokens, vocab]); otherwise
    ``token_ids``/``logprobs`` are the top-k tokens per position ([tokens, k]) and the mass of the others is the
    "rest" bucket (``1 - exp(logprobs).sum(-1)``). ``input_ids``, ``max_length``, ``stride`` and
    ``temperature`` identify what it was computed on; :func:`kl_to_reference` refuses a mismatch.
    """

    input_ids: torch.Tensor
    max_length: int
    stride: int
    temperature: float
    logprobs: torch.Tensor
    token_ids: Optional[torch.Tensor] = None

    @property
    def top_k(self) -> Optional[int]:
        return None if self.token_ids is None else self.token_ids.shape[1]

    def nbytes(self) -> int:
        extra = 0 if self.token_ids is None else self.token_ids.numel() * self.token_ids.element_size()
        return self.logprobs.numel() * self.logprobs.element_size() + extra

    def save(self, path: str) -> None:
        """Write a safetensors file (atomic: temp file + rename); the scalars go into its metadata."""
        from safetensors.torch import save_file

        from ..atomic import atomic_write

        tensors = {"input_ids": self.input_ids.contiguous(), "logprobs": self.logprobs.contiguous()}
        if self.token_ids is not None:
            tensors["token_ids"] = self.token_ids.contiguous()
        meta = {"max_length": str(self.max_length), "stride": str(self.stride), "temperature": repr(self.temperature)}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str) -> "ReferenceLogprobs":
        """Read a file written by :meth:`save` (safetensors only: no pickle), validating its shapes."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        missing = {"input_ids", "logprobs"} - set(tensors) or {"max_length", "stride", "temperature"} - set(meta)
        if missing:
            raise ValueError(f"ReferenceLogprobs.load({path!r}): not a reference file, missing {sorted(missing)}")
        token_ids = tensors.get("token_ids")
        if token_ids is not None and token_ids.shape != tensors["logprobs"].shape:
            raise ValueError(f"ReferenceLogprobs.load({path!r}): token_ids {tuple(token_ids.shape)} != logprobs "
                             f"{tuple(tensors['logprobs'].shape)}")
        return cls(input_ids=tensors["input_ids"], max_length=int(meta["max_length"]), stride=int(meta["stride"]),
                   temperature=float(meta["temperature"]), logprobs=tensors["logprobs"], token_ids=token_ids)

    def check_matches(self, input_ids: torch.Tensor, max_length: int, stride: int, temperature: float) -> None:
        if (max_length, stride) != (self.max_length, self.stride) or not math.isclose(temperature, self.temperature):
            raise ValueError(
                f"ReferenceLogprobs was computed with max_length={self.max_length}, stride={self.stride}, "
                f"temperature={self.temperature}; got max_length={max_length}, stride={stride}, "
                f"temperature={temperature}"
            )
        if input_ids.shape != self.input_ids.shape or not torch.equal(input_ids.cpu(), self.input_ids):
            raise ValueError("ReferenceLogprobs was computed on different `input_ids`")


def reference_logprobs(
    reference_model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_length: int = 512,
    stride: int = 256,
    temperature: float = 1.0,
    top_k: Optional[int] = 1024,
    batch_size: int = 4,
    device: DeviceLike = None,
    progress: bool = True,
) -> ReferenceLogprobs:
    """Run the reference (dense) model once and keep its distributions for :func:`kl_to_reference`.

    ``top_k`` tokens per position (default 1024: 8 KiB per token, ~97% of the exact KL, see the module doc)
    or ``None`` for the full vocabulary.
    """
    ids = _as_stream(input_ids)
    if top_k is not None and top_k < 1:
        raise ValueError(f"argument `top_k` must be >= 1 or None, got {top_k}")
    dev = _prepare(reference_model, device)
    lps, tids = [], []
    with _EvalMode(reference_model):
        for logits, _ in _window_logits(reference_model, ids, max_length, stride, batch_size, dev, progress,
                                        "reference"):
            lp = torch.log_softmax(logits / temperature, dim=-1)
            if top_k is None or top_k >= lp.shape[-1]:
                lps.append(lp.cpu())
            else:
                vals, idx = lp.topk(top_k, dim=-1)
                lps.append(vals.cpu())
                tids.append(idx.to(torch.int32).cpu())
    return ReferenceLogprobs(ids.clone(), max_length, stride, float(temperature), torch.cat(lps),
                             torch.cat(tids) if tids else None)
