"""``--precision auto``: bf16 autocast where it is faster, decided by a CPU flag where the flag is clear, else by timing.

Why: bf16 autocast halves the step time on CPUs with native bf16 matmuls (AVX512-BF16, AMX) and on sm80+ GPUs,
but oneDNN also "supports" bf16 on plain AVX512 (and newer AVX2 parts) by emulation, where it may be slower than
fp32. A flag alone guessed wrong on such machines; where no native-bf16 flag is present, :func:`choose_bf16` times a
few training steps in each precision and keeps the faster.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)

__all__ = ["choose_bf16", "cpu_has_native_bf16", "time_precisions"]

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> Optional[bool]:
    """True/False from the CPU flags (Linux); None where they cannot be read (then only a measurement can tell)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return None
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def time_precisions(step: Callable[[bool], None], repeats: int = 2) -> dict[str, float]:
    """Seconds per call of ``step(use_bf16)`` for fp32 and bf16: one untimed warm-up each, then the best of
    ``repeats`` (the minimum: other processes only ever add time)."""
    out = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        step(bf16)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            step(bf16)
            times.append(time.perf_counter() - t)
        out[name] = min(times)
    return out


def onednn_has_bf16() -> bool:
    """Whether oneDNN can run bf16 on this CPU at all (natively or emulated)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_bf16(precision: str, device: str, step: Optional[Callable[[bool], None]] = None) -> tuple[bool, str]:
    """``(use_bf16, why)`` for ``precision`` in ``auto | bf16 | fp32`` on ``device``.

    ``auto`` on CUDA: ``torch.cuda.is_bf16_supported()``. On CPU: bf16 where the CPU has native bf16 matmuls; fp32
    where oneDNN has no bf16 at all; otherwise (emulated bf16, or flags unreadable) the faster of the two by
    :func:`time_precisions` on ``step`` (a training step taking ``use_bf16``), or fp32 when no ``step`` is given.
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"choose_bf16: argument `precision` must be auto, bf16 or fp32, got {precision!r}")
    if precision != "auto":
        return precision == "bf16", f"--precision {precision}"
    if str(device).startswith("cuda"):
        ok = torch.cuda.is_bf16_supported()
        return ok, "GPU with bf16" if ok else "GPU without bf16"
    onednn = onednn_has_bf16()
    native = cpu_has_native_bf16()
    if native:
        return True, "CPU with native bf16 matmuls"
    if not onednn:
        return False, "CPU without bf16 support"
    if step is None:
        return False, "CPU with emulated bf16 only (not timed)"
    times = time_precisions(step)
    use = times["bf16"] < times["fp32"]
    return use, f"timed: bf16 {times['bf16']:.2f} s vs fp32 {times['fp32']:.2f} s per step"
