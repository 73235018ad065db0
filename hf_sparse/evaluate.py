"""Language-model quality checks: sliding-window perplexity and KL divergence to a reference (dense) model.

Why sliding windows: a long held-out text does not fit one forward pass. Following the transformers docs
("Perplexity of fixed-length models"), windows of ``max_length`` tokens advance by ``stride``; in each window
only the tokens not scored by an earlier window count (labels ``-100`` on the overlap), so every token after
the first is scored exactly once, with up to ``max_length - stride`` tokens of context.

KL to the dense model is the finer signal for a pruned model: perplexity only looks at the true next token,
KL at the whole distribution. Running the dense model once per compared model is wasteful, so
:func:`reference_logprobs` precomputes the reference's distributions once into a :class:`ReferenceLogprobs`
cache. Full-vocabulary log-probs are ``tokens x vocab`` floats (SmolLM2: 49152 x 4 bytes = 192 KiB per
token), so by default the cache keeps the reference's **top-k** tokens per position (8 bytes each) plus the
remaining mass as one "rest" bucket. KL on that coarsened distribution is a lower bound of the exact KL (data
processing inequality). Measured on SmolLM2-135M-Instruct, 3000 held-out Shakespeare tokens, share of the exact
KL recovered:

=========================  ========  ======  ======  ======
compared model             exact KL  k=256   k=1024  k=4096
=========================  ========  ======  ======  ======
one-shot magnitude 2:4     3.547     0.925   0.972   0.994
magnitude 3:4 on MLPs      0.488     0.913   0.967   0.993
=========================  ========  ======  ======  ======

So the default ``top_k=1024`` (8 KiB per token) reads about 3% low, the same way for every model (fine for
ranking); ``top_k=4096`` (32 KiB per token) is within 1%. For final numbers give :func:`kl_to_reference` the
reference *model*: both run window by window, exact, no storage, one extra forward per window. ``top_k=None``
stores full distributions (exact, 192 KiB per token).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
import torch.nn.functional as F

__all__ = [
    "ReferenceLogprobs",
    "evaluate_lm",
    "kl_to_reference",
    "lm_eval_tasks",
    "perplexity",
    "reference_logprobs",
    "sliding_windows",
    "tokenize_texts",
]

DeviceLike = Union[str, torch.device, None]


def tokenize_texts(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """One 1-D token stream of ``texts``, each document followed by the tokenizer's eos (document boundary)."""
    from .training.data import tokenize_text

    if isinstance(texts, str):
        raise TypeError("argument `texts` must be a list of strings, got one string (wrap it in a list)")
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenize_text(text, tokenizer))
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.long)


def sliding_windows(n_tokens: int, max_length: int = 512, stride: int = 256) -> list[tuple[int, int, int]]:
    """``(begin, end, n_scored)`` per window, as in the transformers docs.

    Window ``[begin, end)`` scores its last ``n_scored`` tokens (the first window: all but its first token).
    With ``stride < max_length`` every token but the stream's first is scored exactly once; with
    ``stride == max_length`` (no overlap) each window's first token goes unscored, as in the docs' recipe.
    """
    if max_length < 2:
        raise ValueError(f"argument `max_length` must be >= 2, got {max_length}")
    if not 0 < stride <= max_length:
        raise ValueError(f"argument `stride` must be in [1, max_length={max_length}], got {stride}")
    if n_tokens < 2:
        raise ValueError(f"argument `input_ids` needs at least 2 tokens to score, got {n_tokens}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        scored = min(end - prev_end, end - begin - 1)  # a window's first token has no context inside it
        out.append((begin, end, scored))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _as_stream(input_ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"argument `input_ids` must be a 1-D token stream, got shape {tuple(ids.shape)}")
    return ids.long()


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _prepare(model: torch.nn.Module, device: DeviceLike) -> torch.device:
    """Put the model on ``device`` (if given) and return where its inputs go."""
    if device is not None:
        device = torch.device(device)
        if _model_device(model) != device:
            model.to(device)
        return device
    return _model_device(model)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def _window_logits(
    model: torch.nn.Module,
    ids: torch.Tensor,
    max_length: int,
    stride: int,
    batch_size: int,
    device: torch.device,
    progress: bool,
    desc: str,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(logits [n, vocab] float32, targets [n])`` for the scored tokens of each window, in order.

    Full-length windows go through in batches of ``batch_size`` (no padding needed: all have the same length);
    the shorter last window goes alone. Only the logits of scored positions are computed when the model
    supports ``logits_to_keep`` (saves the lm_head on the overlap).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"argument `batch_size` must be >= 1, got {batch_size}")
    windows = sliding_windows(ids.numel(), max_length, stride)
    keep_ok = _accepts_logits_to_keep(model)
    groups: list[list[tuple[int, int, int]]] = []
    for win in windows:
        if groups and len(groups[-1]) < batch_size and (groups[-1][0][1] - groups[-1][0][0]) == win[1] - win[0] \
                and groups[-1][0][0] > 0 and win[0] > 0:
            groups[-1].append(win)
        else:
            groups.append([win])
    bar = tqdm(total=len(windows), desc=desc, unit="win", disable=not progress, leave=False)
    try:
        for group in groups:
            batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            scored = group[0][2]  # same for every window of a group (first window is alone)
            kwargs = {"logits_to_keep": scored + 1} if keep_ok else {}
            logits = model(input_ids=batch, **kwargs).logits
            logits = logits[:, -(scored + 1) : -1, :].float()
            targets = batch[:, -scored:]
            for row in range(len(group)):
                yield logits[row], targets[row]
            bar.update(len(group))
    finally:
        bar.close()


class _EvalMode:
    """``torch.no_grad`` + ``eval()`` for the block, restoring the previous training flags afterwards."""

    def __init__(self, *models: torch.nn.Module) -> None:
        self.models = models

    def __enter__(self) -> None:
        self.flags = [m.training for m in self.models]
        self.grad = torch.no_grad()
        self.grad.__enter__()
        for m in self.models:
            m.eval()

    def __exit__(self, *exc: Any) -> None:
        for m, flag in zip(self.models, self.flags):
            m.train(flag)
        self.grad.__exit__(*exc)


def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_length: int = 512,
    stride: int = 256,
    batch_size: int = 4,
    device: DeviceLike = None,
    progress: bool = True,
) -> float:
    """Sliding-window perplexity of ``model`` on a 1-D token stream: exp(mean NLL over every scored token)."""
    return evaluate_lm(model, input_ids, max_length=max_length, stride=stride, batch_size=batch_size,
                       device=device, progress=progress)["perplexity"]


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
        import os
        import tempfile

        from safetensors.torch import save_file

        tensors = {"input_ids": self.input_ids.contiguous(), "logprobs": self.logprobs.contiguous()}
        if self.token_ids is not None:
            tensors["token_ids"] = self.token_ids.contiguous()
        meta = {"max_length": str(self.max_length), "stride": str(self.stride), "temperature": repr(self.temperature)}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

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


def _kl_rows(ref_lp: torch.Tensor, ref_ids: Optional[torch.Tensor], model_lp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p_ref || p_model); top-k references compare the (top-k + rest) coarsened distributions."""
    if ref_ids is None:
        return (ref_lp.exp() * (ref_lp - model_lp)).sum(-1)
    model_top = model_lp.gather(-1, ref_ids.long())
    ref_rest = torch.log1p(-ref_lp.exp().sum(-1).clamp(max=1.0 - 1e-7))
    model_rest = torch.log1p(-model_top.exp().sum(-1).clamp(max=1.0 - 1e-7))
    top = (ref_lp.exp() * (ref_lp - model_top)).sum(-1)
    return top + ref_rest.exp() * (ref_rest - model_rest)


def evaluate_lm(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    reference: Union[torch.nn.Module, ReferenceLogprobs, None] = None,
    max_length: int = 512,
    stride: int = 256,
    batch_size: int = 4,
    temperature: float = 1.0,
    device: DeviceLike = None,
    progress: bool = True,
) -> dict[str, float]:
    """Perplexity and (with ``reference``) mean per-token KL(p_ref || p_model) from ONE pass of ``model``.

    ``reference`` is a model (run window by window beside ``model``: exact) or a :class:`ReferenceLogprobs`.
    Returns ``{"perplexity", "nll", "tokens"}`` plus ``"kl"`` when a reference is given.
    """
    ids = _as_stream(input_ids)
    dev = _prepare(model, device)
    ref_iter = None
    cache: Optional[ReferenceLogprobs] = None
    models = [model]
    if isinstance(reference, ReferenceLogprobs):
        cache = reference
        cache.check_matches(ids, max_length, stride, temperature)
    elif reference is not None:
        if not isinstance(reference, torch.nn.Module):
            raise TypeError(f"argument `reference` must be a model or ReferenceLogprobs, got {type(reference)}")
        ref_dev = _prepare(reference, device if device is not None else dev)
        models.append(reference)
        ref_iter = _window_logits(reference, ids, max_length, stride, batch_size, ref_dev, False, "reference")
    nll, kl, count = 0.0, 0.0, 0
    with _EvalMode(*models):
        for logits, targets in _window_logits(model, ids, max_length, stride, batch_size, dev, progress, "eval"):
            nll += F.cross_entropy(logits, targets, reduction="sum").item()
            n = targets.numel()
            if reference is not None:
                model_lp = torch.log_softmax(logits / temperature, dim=-1)
                if cache is not None:
                    ref_lp = cache.logprobs[count : count + n].to(model_lp.device)
                    ref_ids = None if cache.token_ids is None else cache.token_ids[count : count + n].to(model_lp.device)
                else:
                    ref_logits, _ = next(ref_iter)
                    ref_lp, ref_ids = torch.log_softmax(ref_logits.to(model_lp.device) / temperature, dim=-1), None
                kl += _kl_rows(ref_lp, ref_ids, model_lp).sum().item()
            count += n
    out = {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}
    if reference is not None:
        out["kl"] = kl / count
    return out


def kl_to_reference(
    model: torch.nn.Module,
    reference_model: Union[torch.nn.Module, ReferenceLogprobs],
    input_ids: torch.Tensor,
    max_length: int = 512,
    stride: int = 256,
    temperature: float = 1.0,
    batch_size: int = 4,
    device: DeviceLike = None,
    progress: bool = True,
) -> float:
    """Mean per-token KL(p_ref || p_model) over the sliding windows (0 when the model equals the reference).

    ``reference_model``: the dense model (exact), or a :class:`ReferenceLogprobs` from :func:`reference_logprobs`
    (computed once, reused for every compared model).
    """
    if reference_model is None:
        raise ValueError("argument `reference_model` is required (a model or ReferenceLogprobs)")
    return evaluate_lm(model, input_ids, reference=reference_model, max_length=max_length, stride=stride,
                       batch_size=batch_size, temperature=temperature, device=device, progress=progress)["kl"]


def lm_eval_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    task_yaml_or_dir: str,
    tasks: Optional[list[str]] = None,
    batch_size: int = 8,
    limit: Optional[int] = None,
    device: DeviceLike = None,
    num_fewshot: Optional[int] = None,
) -> dict[str, dict[str, Any]]:
    """Run LOCAL lm-eval (0.4.x) task files on an in-memory model, offline; returns lm-eval's ``results``.

    ``task_yaml_or_dir``: one task YAML (its ``task:`` name is run) or a folder of them (``tasks`` picks names;
    default: every task defined there). Needs the ``eval`` extra: ``pip install 'hf-sparse[eval]'``.
    """
    import os

    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(
            "hf_sparse.evaluate.lm_eval_tasks needs lm-eval 0.4.x: pip install 'hf-sparse[eval]' "
            f"(or pip install 'lm-eval>=0.4'); import failed: {err}"
        ) from err
    import yaml

    path = os.path.abspath(task_yaml_or_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"argument `task_yaml_or_dir`={task_yaml_or_dir!r} does not exist")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(path) for f in names if f.endswith((".yaml", ".yml")))
    defined = []
    for file in files:
        with open(file, encoding="utf-8") as fh:
            spec = yaml.load(fh, Loader=yaml.BaseLoader) or {}  # lm-eval YAMLs may carry !function tags
        if isinstance(spec, dict) and isinstance(spec.get("task"), str):
            defined.append(spec["task"])
    names = list(tasks) if tasks else defined
    if not names:
        raise ValueError(f"no `task:` entries found in {task_yaml_or_dir!r}; pass argument `tasks`")
    dev = _prepare(model, device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(dev))
    manager = TaskManager(include_path=folder, include_defaults=False)
    with _EvalMode(model):
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False)
    return out["results"]
