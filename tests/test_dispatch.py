"""Kernel choice: autotune's cache/override/correctness gate, and the dispatch of packed linears.

Timing is never asserted: where a choice between correct candidates is tested, the clock is an
injected deterministic function (our own parameter), so the rule "fastest correct, dense unless a
sparse path beats it by the margin" is what is checked.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F

from hf_sparse.kernels import autotune
from hf_sparse.kernels.autotune import AutotuneCache, TuneKey, m_bucket, select_backend


def _key(m: int = 1, device: str = "NVIDIA H100 80GB HBM3") -> TuneKey:
    return TuneKey(device, 64, 32, m_bucket(m), "float32", "w4g32")


def _candidates(weight: torch.Tensor, calls: list[str]):
    """Real linear maths; each call appends its name to ``calls`` (so a test clock knows what ran)."""

    def named(name, fn):
        def run(x):
            calls.append(name)
            return fn(x)

        return run

    return {
        "dense": named("dense", lambda x: F.linear(x, weight)),
        "semi_structured": named("semi_structured", lambda x: F.linear(x, weight)),  # same math, other route
        "triton_w4a16": named("triton_w4a16", lambda x: F.linear(x, weight) * 1.5),  # wrong result
    }


def _clock(calls: list[str], fake_ms: dict[str, float]):
    def clock(fn):
        fn()
        return fake_ms[calls[-1]]

    return clock


def test_m_bucket_rounds_up_and_saturates():
    assert [m_bucket(m) for m in (1, 2, 3, 16, 17, 2048, 2049, 10**6)] == [1, 2, 4, 16, 32, 2048, 4096, 8192]
    with pytest.raises(ValueError, match="tokens"):
        m_bucket(0)


def test_measured_choice_rejects_wrong_results_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.delenv(autotune.ENV_OVERRIDE, raising=False)
    calls: list[str] = []
    cands = _candidates(torch.randn(64, 32), calls)
    clock = _clock(calls, {"dense": 1.0, "semi_structured": 0.5, "triton_w4a16": 0.1})
    cache = AutotuneCache(tmp_path / "cache" / "autotune.json")
    choice = select_backend(_key(), cands, lambda: torch.randn(1, 32), cache=cache, measure=True, timer=clock)
    assert choice.backend == "semi_structured" and choice.source == "measured"
    assert "wrong result" in choice.rejected["triton_w4a16"] and "triton_w4a16" not in choice.times_ms
    on_disk = json.loads((tmp_path / "cache" / "autotune.json").read_text())
    assert on_disk["entries"][str(_key())]["backend"] == "semi_structured"
    # a second selection (fresh cache object = next process) reads the file and runs nothing
    n_calls = len(calls)
    again = select_backend(_key(), cands, lambda: torch.randn(1, 32), cache=AutotuneCache(cache.path), timer=clock)
    assert again.backend == "semi_structured" and again.source == "cache" and len(calls) == n_calls
    # another M bucket is a different decision
    assert AutotuneCache(cache.path).get(_key(m=16)) is None
    assert not list((tmp_path / "cache").glob(".autotune-*"))  # no temp files left behind


def test_sparse_must_beat_dense_by_margin(tmp_path):
    weight = torch.randn(64, 32)
    calls: list[str] = []
    cands = {k: v for k, v in _candidates(weight, calls).items() if k != "triton_w4a16"}
    clock = _clock(calls, {"dense": 1.0, "semi_structured": 0.99})
    choice = select_backend(_key(16), cands, lambda: torch.randn(16, 32), measure=True, timer=clock, margin=0.03)
    assert choice.backend == "dense" and set(choice.times_ms) == {"dense", "semi_structured"}


def test_failing_candidate_is_skipped():
    weight = torch.randn(64, 32)

    def broken(x):
        raise RuntimeError("shape not supported by cuSPARSELt")

    choice = select_backend(
        _key(), {"dense": lambda x: F.linear(x, weight), "semi_structured": broken},
        lambda: torch.randn(1, 32), measure=True,
    )
    assert choice.backend == "dense" and "cuSPARSELt" in choice.rejected["semi_structured"]


def test_override_argument_and_env(monkeypatch):
    weight = torch.randn(64, 32)
    cands = {"dense": lambda x: F.linear(x, weight), "triton_w4a16": lambda x: F.linear(x, weight)}
    assert select_backend(_key(), cands, lambda: torch.randn(1, 32), override="triton_w4a16").source == "override"
    monkeypatch.setenv(autotune.ENV_OVERRIDE, "triton_w4a16")
    assert select_backend(_key(), cands, lambda: torch.randn(1, 32)).backend == "triton_w4a16"
    monkeypatch.setenv(autotune.ENV_OVERRIDE, "cutlass_magic")
    with pytest.raises(ValueError, match="cutlass_magic.*HF_SPARSE_KERNEL"):
        select_backend(_key(), cands, lambda: torch.randn(1, 32))


def test_cpu_defaults_to_dense_without_measuring(monkeypatch):
    monkeypatch.delenv(autotune.ENV_OVERRIDE, raising=False)
    seen = []
    cands = {"dense": lambda x: seen.append("dense") or x, "triton_w4a16": lambda x: seen.append("t") or x}
    choice = select_backend(_key(device="cpu"), cands, lambda: torch.randn(1, 32))
    assert choice.backend == "dense" and choice.source == "default" and seen == []


def test_corrupt_cache_file_is_remeasured(tmp_path):
    path = tmp_path / "autotune.json"
    path.write_text("{not json")
    cache = AutotuneCache(path)
    assert cache.get(_key()) is None
    cache.put(_key(), {"backend": "dense", "times_ms": {"dense": 1.0}})
    assert json.loads(path.read_text())["entries"][str(_key())]["backend"] == "dense"


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path / "c"))
    assert AutotuneCache().path == tmp_path / "c" / "autotune.json"
    assert os.fspath(autotune.default_cache_path()).startswith(str(tmp_path))


# ---------------------------------------------------------------- dispatch of real exported packed linears
def _export_tiny(tmp_path, bits: int, group_size: int = 32):
    from conftest import tiny_model

    import hf_sparse

    model = tiny_model("llama", seed=3)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                mod.weight.mul_(hf_sparse.nm_mask(mod.weight.abs(), 2, 4, dim=1))
    out = tmp_path / f"export-{bits}"
    hf_sparse.export(model, out, bits=bits, group_size=group_size)
    return out


def _load(path):
    from transformers import AutoModelForCausalLM

    from hf_sparse.modules import PackedNMLinear

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedNMLinear)}
    assert packed, "export loaded without packed linears"
    return model, packed


def _chosen(packed) -> set[str]:
    return {v for m in packed.values() for v in m.__dict__.get("_dispatch_memo", {}).values()}


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv(autotune.ENV_OVERRIDE, raising=False)
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path / "autotune-cache"))
    from hf_sparse.kernels import dispatch

    monkeypatch.setattr(dispatch, "FORCE_PATH", None)
    return monkeypatch


def test_cpu_default_is_dense_and_measures_nothing(tmp_path, clean_env):
    from hf_sparse.kernels import dispatch

    model, packed = _load(_export_tiny(tmp_path, bits=4))
    with torch.no_grad():
        model(torch.randint(0, 96, (2, 5)))
    assert _chosen(packed) == {"dense"}
    assert not (tmp_path / "autotune-cache").exists()  # nothing measured on CPU
    first = next(iter(packed.values()))
    assert dispatch.candidate_paths(first, torch.randn(3, first.in_features)) == (
        ["dense", "triton_w4a16"] if os.environ.get("TRITON_INTERPRET") == "1" else ["dense"]
    )


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                    reason="the Triton path runs on CPU only in its interpreter (the `gpu` extra, TRITON_INTERPRET=1)")
def test_triton_override_on_cpu_matches_dense(tmp_path, clean_env):
    path = _export_tiny(tmp_path, bits=4)
    model, packed = _load(path)
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        dense_logits = model(ids).logits
    clean_env.setenv(autotune.ENV_OVERRIDE, "triton_w4a16")
    model2, packed2 = _load(path)
    with torch.no_grad():
        triton_logits = model2(ids).logits
    assert _chosen(packed2) == {"triton_w4a16"}
    torch.testing.assert_close(triton_logits, dense_logits, rtol=1e-4, atol=1e-4)


def test_triton_path_is_not_used_when_autograd_needs_it(tmp_path, clean_env):
    from hf_sparse.kernels import dispatch

    model, packed = _load(_export_tiny(tmp_path, bits=4))
    module = next(iter(packed.values()))
    x = torch.randn(2, module.in_features, requires_grad=True)
    assert "triton_w4a16" not in dispatch.candidate_paths(module, x)
    clean_env.setenv(autotune.ENV_OVERRIDE, "triton_w4a16")
    with pytest.raises(ValueError, match="triton_w4a16.*not available"):
        module(x)


def test_fp16_export_has_no_int4_path_and_force_path_still_wins(tmp_path, clean_env):
    from hf_sparse.kernels import dispatch

    model, packed = _load(_export_tiny(tmp_path, bits=16))
    module = next(iter(packed.values()))
    x = torch.randn(1, module.in_features)
    assert dispatch.candidate_paths(module, x) == ["dense"]
    assert dispatch.tune_model(model, m_values=(1, 64), dtype=torch.float32)[next(iter(packed))] == {1: "dense", 64: "dense"}
    clean_env.setenv(autotune.ENV_OVERRIDE, "triton_w4a16")
    with pytest.raises(ValueError, match="HF_SPARSE_KERNEL"):
        model(torch.randint(0, 96, (1, 4)))
    clean_env.setattr(dispatch, "FORCE_PATH", "dense")
    with torch.no_grad():
        assert model(torch.randint(0, 96, (1, 4))).logits.shape == (1, 4, 96)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_dispatch_measures_caches_and_is_correct(tmp_path, clean_env):
    from transformers import AutoModelForCausalLM

    from hf_sparse.kernels import dispatch

    path = _export_tiny(tmp_path, bits=4)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map="cuda").eval()
    ids = torch.randint(0, 96, (1, 8), device="cuda")
    clean_env.setattr(dispatch, "FORCE_PATH", "dense")
    with torch.no_grad():
        ref = model(ids).logits.float()
    clean_env.setattr(dispatch, "FORCE_PATH", None)
    with torch.no_grad():
        out = model(ids).logits.float()
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    cache = json.loads((tmp_path / "autotune-cache" / "autotune.json").read_text())
    assert cache["entries"] and all(e["backend"] in dispatch.PATHS for e in cache["entries"].values())
