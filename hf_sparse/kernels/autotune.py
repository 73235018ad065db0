"""Pick the fastest *correct* matmul path per (GPU, weight shape, M bucket, dtype), cached on disk.

Why: whether 2:4 beats dense depends on the GPU, the shape and above all on M (tokens per call):
cuSPARSELt loses at decode-sized M, the int4 x 2:4 kernel loses at prefill-sized M. A short
measurement the first time a (GPU, shape, M bucket, dtype) is seen settles it; dense is always a
candidate and a sparse path must beat it by ``margin``, so the choice is never slower than dense
(up to timing noise). Results live in ``$HF_SPARSE_CACHE_DIR/autotune.json`` (default
``~/.cache/hf_sparse``), written atomically, so the next load skips the measurement.

Overrides: ``HF_SPARSE_KERNEL=<backend>`` (or the ``override=`` argument) forces a backend;
``HF_SPARSE_AUTOTUNE=0`` disables measuring (dense unless cached or overridden). On CPU nothing is
measured: the dense dequantized path is the default there.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..atomic import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = [
    "DENSE",
    "ENV_OVERRIDE",
    "ENV_CACHE_DIR",
    "ENV_AUTOTUNE",
    "M_BUCKETS",
    "TuneKey",
    "Choice",
    "AutotuneCache",
    "m_bucket",
    "device_name",
    "time_ms",
    "select_backend",
]

DENSE = "dense"
ENV_OVERRIDE = "HF_SPARSE_KERNEL"
ENV_CACHE_DIR = "HF_SPARSE_CACHE_DIR"
ENV_AUTOTUNE = "HF_SPARSE_AUTOTUNE"
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
CACHE_VERSION = 1
CPU_REPS = 5  # CPU timings are milliseconds each: fewer repeats keep the first use of a shape short


def m_bucket(m: int) -> int:
    """The smallest bucket >= m (the last bucket for anything larger): nearby M share one decision."""
    if m < 1:
        raise ValueError(f"m_bucket: number of tokens must be >= 1, got {m}")
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu:{_cpu_model()}"
    return device.type


def _cpu_model() -> str:
    """The CPU model and whether it has native bf16 (decisions measured on one CPU are not reused on another)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = f.read()
    except OSError:
        import platform

        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extras = [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in flags]
    return f"{name} ({','.join(extras) or 'no avx2'}, {torch.get_num_threads()} threads)"


@dataclass(frozen=True)
class TuneKey:
    """What a decision depends on. ``variant`` names the stored weight format (e.g. ``w4g128``, ``fp16``)."""

    device: str
    out_features: int
    in_features: int
    m_bucket: int
    dtype: str
    variant: str = ""

    def __str__(self) -> str:
        return f"{self.device}|{self.out_features}x{self.in_features}|m{self.m_bucket}|{self.dtype}|{self.variant}"


@dataclass
class Choice:
    backend: str
    source: str  # "override" | "cache" | "measured" | "default"
    times_ms: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)


def default_cache_path() -> Path:
    root = os.environ.get(ENV_CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "hf_sparse")
    return Path(root) / "autotune.json"


class AutotuneCache:
    """A JSON file of decisions keyed by :class:`TuneKey`; every write is atomic (:func:`hf_sparse.atomic.atomic_write_json`)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_cache_path()
        self._lock = threading.Lock()
        self._entries: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = {}
            if self.path.exists():
                try:
                    data = json.loads(self.path.read_text())
                    if data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict):
                        self._entries = data["entries"]
                    else:
                        logger.warning("hf_sparse autotune cache %s has another version; re-measuring", self.path)
                except (OSError, ValueError) as err:  # a corrupt cache costs a re-measurement, never a crash
                    logger.warning("hf_sparse autotune cache %s unreadable (%s); re-measuring", self.path, err)
        return self._entries

    def get(self, key: TuneKey) -> dict | None:
        with self._lock:
            return self._load().get(str(key))

    def put(self, key: TuneKey, record: dict) -> None:
        with self._lock:
            entries = self._load()
            # merge with what other processes wrote meanwhile, then replace atomically
            if self.path.exists():
                try:
                    on_disk = json.loads(self.path.read_text())
                    if on_disk.get("version") == CACHE_VERSION:
                        entries = {**on_disk.get("entries", {}), **entries}
                except (OSError, ValueError):
                    pass
            entries[str(key)] = record
            self._entries = entries
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json({"version": CACHE_VERSION, "entries": entries}, self.path, indent=1, sort_keys=True)


def time_ms(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of ``fn()`` in ms: Triton's ``do_bench`` on a GPU (L2 flush, CUDA events; plain CUDA events
    when Triton is missing), ``perf_counter`` on CPU. ``warmup``/``reps`` count calls outside ``do_bench``."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(fn, warmup=max(1, warmup) * 5, rep=max(1, reps) * 10, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def interleaved_min_ms(fns: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """CPU timing that other processes on the machine cannot tilt: one call of each candidate per round, in turn
    (a burst of load hits all of them alike), and the fastest call of each (load only ever adds time).

    Timing each candidate in its own block with a median once chose a path 2.4x slower than dense at M=512 on a
    shared 2-core machine (issue 15); the candidates' first calls (warm-up, conversions) are outside the rounds.
    """
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(max(1, rounds)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return best


def _override(override: str | None) -> str | None:
    return override or os.environ.get(ENV_OVERRIDE) or None


def select_backend(
    key: TuneKey,
    candidates: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    make_input: Callable[[], torch.Tensor],
    *,
    override: str | None = None,
    cache: AutotuneCache | None = None,
    measure: bool | None = None,
    timer: Callable[[Callable[[], object]], float] | None = None,
    margin: float = 0.03,
    rel_tol: float = 2e-2,
    reps: int | None = None,
) -> Choice:
    """Choose among ``candidates`` (name -> ``f(x) -> y``; must contain ``"dense"``, the reference).

    Order: override -> cached decision -> measurement (GPU by default; CPU when the dispatch asks) -> dense. A candidate
    that raises or whose output differs from dense by more than ``rel_tol`` (relative to ``max|y|``) is
    rejected. A sparse path wins only if it is faster than dense by more than ``margin``.
    """
    if DENSE not in candidates:
        raise ValueError(f"select_backend: candidates must include {DENSE!r}, got {sorted(candidates)}")
    forced = _override(override)
    if forced is not None:
        if forced not in candidates:
            raise ValueError(
                f"select_backend: override {forced!r} (argument or ${ENV_OVERRIDE}) is not available for {key}; "
                f"available: {sorted(candidates)}"
            )
        return Choice(forced, "override")
    if len(candidates) == 1:
        return Choice(DENSE, "default")

    cached = cache.get(key) if cache is not None else None
    if cached is not None and cached.get("backend") in candidates:
        return Choice(cached["backend"], "cache", cached.get("times_ms", {}), cached.get("rejected", {}))

    if measure is None:
        measure = not key.device.startswith(("cpu", "meta")) and os.environ.get(ENV_AUTOTUNE, "1") != "0"
    if not measure:
        return Choice(DENSE, "default")

    x = make_input()
    with torch.no_grad():
        y_ref = candidates[DENSE](x).float()
    ref_scale = max(y_ref.abs().max().item(), 1e-6)
    device = x.device
    rejected: dict[str, str] = {}
    valid = {DENSE: candidates[DENSE]}
    for name, fn in candidates.items():
        if name == DENSE:
            continue
        try:
            with torch.no_grad():
                err = (fn(x).float() - y_ref).abs().max().item() / ref_scale
        except Exception as exc:  # unsupported shape/dtype on this GPU: not a candidate here
            rejected[name] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        if not err <= rel_tol:  # also catches NaN
            rejected[name] = f"wrong result: max rel error {err:.3g} > {rel_tol}"
        else:
            valid[name] = fn
    with torch.no_grad():
        if timer is not None or device.type != "cpu":
            clock = timer or (lambda fn: time_ms(fn, device, reps=reps or 10))
            times: dict[str, float] = {name: clock(lambda fn=fn: fn(x)) for name, fn in valid.items()}
        else:
            times = interleaved_min_ms({name: (lambda fn=fn: fn(x)) for name, fn in valid.items()}, reps or CPU_REPS)
    best = DENSE
    for name, t in times.items():
        if name != DENSE and t < times[DENSE] * (1.0 - margin) and t < times[best]:
            best = name
    choice = Choice(best, "measured", times, rejected)
    logger.info("hf_sparse autotune %s -> %s %s", key, best, {k: round(v, 4) for k, v in times.items()})
    if cache is not None:
        cache.put(key, {"backend": best, "times_ms": times, "rejected": rejected, "torch": torch.__version__})
    return choice
