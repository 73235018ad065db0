"""CPU paths of the dispatch (torch's int4/int8 weight-only kernels, bf16 dense) against the exact dense reference.

Tolerances: the kernels compute in bf16 (8 mantissa bits): relative error of the output <= 1e-2 per layer, and
the loaded model's logits within 2e-2 of the exact (fp32 dequantized) model's.
"""

from __future__ import annotations

import copy

import time

import pytest
import torch
from conftest import tiny_model
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import hf_sparse
from hf_sparse import ASTConfig
from hf_sparse.format import NMSpec
from hf_sparse.kernels import cpu, dispatch
from hf_sparse.modules import PackedNMLinear
from hf_sparse.quantization import pack_rtn
from hf_sparse.sparsity import nm_mask


@pytest.fixture(autouse=True)
def cpu_kernels_on(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu.ENV_CPU_KERNELS, "1")
    monkeypatch.setenv("HF_SPARSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(dispatch, "_DISK_CACHE", [])
    yield


def packed_linear(out_f: int, in_f: int, spec: NMSpec, bias: bool, seed: int) -> PackedNMLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    p = pack_rtn(w, nm_mask(w.abs(), spec.n, spec.m), spec)
    module = PackedNMLinear(in_f, out_f, spec, bias=bias)
    with torch.no_grad():
        module.nm_values.copy_(p.values)
        module.nm_positions.copy_(p.positions)
        if p.scales is not None:
            module.nm_scales.copy_(p.scales)
        if p.zeros is not None:
            module.nm_zeros.copy_(p.zeros)
        if bias:
            module.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
    return module


def offered(module, x) -> list[str]:
    """The candidates the automatic CPU choice sees (Triton on CPU is its interpreter: override only)."""
    return [n for n in dispatch.candidate_paths(module, x) if n != "triton_w4a16"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


CASES = [  # (path, out, in, spec kwargs)
    ("cpu_int4", 64, 256, dict(bits=4, group_size=32)),
    ("cpu_int4", 48, 576, dict(bits=4, group_size=64)),
    ("cpu_int4", 32, 512, dict(bits=4, group_size=128, symmetric=False)),
    ("cpu_int4", 16, 512, dict(bits=4, group_size=256)),
    ("cpu_int4", 32, 128, dict(bits=4, group_size=None)),  # per channel = one group of 128
    ("cpu_int8", 40, 192, dict(bits=8, group_size=None)),
    ("cpu_int8", 7, 64, dict(bits=8, group_size=None)),
    ("dense_lowp", 24, 96, dict(bits=16, values_dtype="bfloat16")),
]


@pytest.mark.parametrize("path, out_f, in_f, kwargs", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_path_matches_the_dense_reference(path, out_f, in_f, kwargs, bias):
    module = packed_linear(out_f, in_f, NMSpec(**kwargs), bias, seed=out_f + in_f)
    for shape in [(1, in_f), (5, in_f), (2, 3, in_f)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert dispatch.candidate_paths(module, x)[0] == "dense" and path in dispatch.candidate_paths(module, x)
            ref = dispatch.dense_forward(module, x)
            got = dispatch.PATHS[path](module, x)
        assert got.shape == ref.shape and got.dtype == x.dtype
        assert rel(got, ref) <= 1e-2, (path, shape)


DEQUANT_CASES = [  # (out, in, spec kwargs): every int4/int8 layout, ragged last groups and asymmetric included
    (64, 256, dict(bits=4, group_size=32)),
    (48, 192, dict(bits=4, group_size=128, symmetric=False)),  # 192 = 128 + 64: no int4 kernel, this path still runs
    (20, 128, dict(bits=4, group_size=64)),
    (40, 192, dict(bits=8, group_size=None)),
    (24, 200, dict(bits=8, group_size=64, symmetric=False)),
]


@pytest.mark.parametrize("out_f, in_f, kwargs", DEQUANT_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_dequant_bf16_matches_the_dense_reference_at_prefill_sizes(out_f, in_f, kwargs, bias, monkeypatch):
    monkeypatch.setattr(cpu, "_NATIVE_BF16", [True])  # correct anywhere; offered only where bf16 is native
    module = packed_linear(out_f, in_f, NMSpec(**kwargs), bias, seed=out_f * in_f)
    for shape in [(cpu.DEQUANT_MIN_M, in_f), (2, 70, in_f)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert "dequant_bf16" in offered(module, x)
            ref = dispatch.dense_forward(module, x)
            got = dispatch.PATHS["dequant_bf16"](module, x)
        assert got.shape == ref.shape and got.dtype == x.dtype
        assert rel(got, ref) <= 1e-2, shape
    assert set(module._kernel_cache) <= {"dense", "dense_key"}  # the path keeps nothing: rebuilt per call
    with torch.no_grad():
        assert "dequant_bf16" not in offered(module, torch.randn(cpu.DEQUANT_MIN_M - 1, in_f))  # decode sizes
    with torch.no_grad():  # bf16 activations: the dense path is this computation already
        assert "dequant_bf16" not in offered(module, torch.randn(cpu.DEQUANT_MIN_M, in_f, dtype=torch.bfloat16))
    monkeypatch.setattr(cpu, "_NATIVE_BF16", [False])
    with torch.no_grad():
        assert "dequant_bf16" not in offered(module, torch.randn(cpu.DEQUANT_MIN_M, in_f))


def test_prefill_and_decode_choose_by_measurement_per_m_bucket(monkeypatch):
    """At M=512 the fake clock has the bf16 re-dequantizing path fastest, at M=1 the int4 kernel; each bucket gets its
    own winner, dense is never kept, and the int4 layout stays for decode."""
    from hf_sparse.kernels import autotune

    monkeypatch.setattr(cpu, "_NATIVE_BF16", [True])
    module = packed_linear(64, 256, NMSpec(bits=4, group_size=64), False, 2)
    seen: dict[int, set] = {}
    clock = {"dense": 10.0, "cpu_int4": 9.0, "dequant_bf16": 4.0}  # prefill-sized: bf16 GEMM wins

    def fake_time(fns, rounds):
        m = seen_m["m"]
        seen[m] = set(fns)
        decode = {"dense": 1.0, "cpu_int4": 0.3}
        return {name: (fn(), (decode if m == 1 else clock)[name])[1] for name, fn in fns.items()}

    seen_m = {"m": 512}
    monkeypatch.setattr(autotune, "interleaved_min_ms", fake_time)
    with torch.no_grad():
        assert dispatch.choose_path(module, torch.randn(512, 256)) == "dequant_bf16"
        seen_m["m"] = 1
        assert dispatch.choose_path(module, torch.randn(1, 256)) == "cpu_int4"
    assert seen == {512: {"dense", "cpu_int4", "dequant_bf16"}, 1: {"dense", "cpu_int4"}}
    assert "dense" not in module._kernel_cache and "cpu_int4" in module._kernel_cache
    clock.update(dequant_bf16=11.0, cpu_int4=12.0)  # both slower than dense at a new bucket: dense it is
    seen_m["m"] = 256
    with torch.no_grad():
        assert dispatch.choose_path(module, torch.randn(256, 256)) == "dense"


def test_unsupported_layouts_are_not_offered():
    x = torch.randn(2, 192)
    ragged = packed_linear(16, 192, NMSpec(bits=4, group_size=128), False, 0)  # 192 = 128 + 64: ragged last group
    grouped_int8 = packed_linear(16, 192, NMSpec(bits=8, group_size=64), False, 0)
    odd_rows = packed_linear(20, 128, NMSpec(bits=4, group_size=64), False, 0)  # int4 kernel needs out % 16
    fp16 = packed_linear(16, 192, NMSpec(bits=16, values_dtype="float16"), False, 0)
    with torch.no_grad():
        for module in (ragged, grouped_int8, odd_rows, fp16):
            assert offered(module, x[..., : module.in_features]) == ["dense"]
    with torch.enable_grad():  # the kernels have no autograd: a grad-requiring input keeps the dense path
        module = packed_linear(32, 128, NMSpec(bits=4, group_size=64), False, 0)
        assert offered(module, torch.randn(2, 128, requires_grad=True)) == ["dense"]


def test_switch_turns_them_off(monkeypatch):
    module = packed_linear(32, 128, NMSpec(bits=4, group_size=64), False, 0)
    monkeypatch.setenv(cpu.ENV_CPU_KERNELS, "0")
    with torch.no_grad():
        assert offered(module, torch.randn(2, 128)) == ["dense"]


def test_dispatch_measures_on_cpu_caches_and_drops_the_dense_copy(monkeypatch):
    module = packed_linear(64, 256, NMSpec(bits=4, group_size=64), False, 0)
    from hf_sparse.kernels import autotune

    def fake_time(fns, rounds):  # the kernel "wins": a deterministic clock for the test
        assert set(fns) == {"dense", "cpu_int4"}
        return {name: (fn(), 1.0 if name == "dense" else 0.5)[1] for name, fn in fns.items()}

    monkeypatch.setattr(autotune, "interleaved_min_ms", fake_time)
    x = torch.randn(1, 256)
    with torch.no_grad():
        y = module(x)
    assert dispatch.choose_path(module, x) == "cpu_int4"
    assert "dense" not in module._kernel_cache and "cpu_int4" in module._kernel_cache  # no fp32 dense copy kept
    records = dispatch._disk_cache()._entries
    assert any(r["backend"] == "cpu_int4" for r in records.values())
    assert any(k.startswith("cpu:") for k in records)  # keyed by the CPU model, not just "cpu"
    with torch.no_grad():
        assert rel(y, dispatch.dense_forward(module, x)) <= 1e-2


def test_a_slower_kernel_is_not_chosen(monkeypatch):
    from hf_sparse.kernels import autotune

    module = packed_linear(64, 256, NMSpec(bits=4, group_size=64), False, 1)
    def fake_time(fns, rounds):  # the kernel is slower than dense
        return {name: 1.0 if name == "dense" else 5.0 for name in fns}

    monkeypatch.setattr(autotune, "interleaved_min_ms", fake_time)
    with torch.no_grad():
        assert dispatch.choose_path(module, torch.randn(1, 256)) == "dense"


def test_cpu_timing_interleaves_candidates_and_keeps_the_fastest_call():
    """A load burst during one candidate's block must not decide: each round times every candidate once."""
    from hf_sparse.kernels import autotune

    order: list[str] = []
    stall = {"left": 3}

    def slow_when_loaded(name):
        def fn():
            order.append(name)
            if name == "a" and stall["left"]:  # the machine is busy during a's first calls only
                stall["left"] -= 1
                time.sleep(0.05)
        return fn

    times = autotune.interleaved_min_ms({"a": slow_when_loaded("a"), "b": slow_when_loaded("b")}, rounds=5)
    assert order[2:] == ["a", "b"] * 5  # a warm-up call each, then strictly alternating rounds
    assert times["a"] < 10 and times["b"] < 10  # the stalled calls (50 ms) are not what is reported


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 32, True), (4, 32, False), (8, None, True)])
def test_loaded_export_runs_the_kernels_and_stays_close(tmp_path, bits, group_size, symmetric):
    model = get_peft_model(tiny_model("llama"), ASTConfig())
    hf_sparse.export(model, tmp_path / "e", bits=bits, group_size=group_size, symmetric=symmetric)
    reference = hf_sparse.fake_quantize(copy.deepcopy(model), bits=bits, group_size=group_size, symmetric=symmetric)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "e")
    ids = torch.randint(0, 96, (2, 12))
    path = "cpu_int4" if bits == 4 else "cpu_int8"
    dispatch.FORCE_PATH = path
    try:
        with torch.no_grad():
            got = loaded(ids).logits
    finally:
        dispatch.FORCE_PATH = None
    packed = [m for m in loaded.modules() if isinstance(m, PackedNMLinear)]
    assert all(path in m._kernel_cache and "dense" not in m._kernel_cache for m in packed)
    with torch.no_grad():
        assert rel(got, reference(ids).logits) <= 2e-2
    dense = loaded.dequantize()  # the dense model on request, as before
    with torch.no_grad():
        assert rel(dense(ids).logits, reference(ids).logits) <= 1e-5


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 64, True), (4, 32, False), (8, None, True)])
def test_kernel_codes_dequantize_to_the_exact_weight(bits, group_size, symmetric):
    """The dense codes the int4/int8 kernels are converted from: (code - zero) * scale is the stored weight, bit for
    bit, pruned places included (they hold the code of an exact 0)."""
    module = packed_linear(32, 256, NMSpec(bits=bits, group_size=group_size, symmetric=symmetric), False, 3)
    gs = group_size or 256
    scales = module.nm_scales.float()
    zero = module.nm_zeros.float() if not symmetric else torch.full_like(scales, 2.0 ** (bits - 1))
    codes = cpu._dense_codes(module, zero, gs)
    assert codes.dtype == torch.int32 and codes.shape == (32, 256)
    per_input = lambda t: t.repeat_interleave(gs, dim=1)  # noqa: E731
    got = (codes.float() - per_input(zero)) * per_input(scales)
    assert torch.equal(got, module.dequantized_weight(torch.float32))
