"""GPU: the semi-structured (2:4 sparse kernel) path against the dense dequantized reference."""

from __future__ import annotations

import pytest
import torch
from test_export import ast_model, rel_err
from transformers import AutoModelForCausalLM

import hf_sparse
from hf_sparse.format import NMSpec
from hf_sparse.quantization import pack_rtn
from hf_sparse.kernels import dispatch
from hf_sparse.modules import PackedNMLinear
from hf_sparse.sparsity import nm_mask

pytestmark = pytest.mark.gpu

needs_sm80 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="needs a CUDA GPU with compute capability >= 8.0",
)


def packed_layer(out_f: int, in_f: int, bits: int, dtype: torch.dtype) -> PackedNMLinear:
    torch.manual_seed(0)
    w = torch.randn(out_f, in_f) * 0.05
    spec = NMSpec(bits=bits, group_size=128 if bits < 16 else None)
    packed = pack_rtn(w, nm_mask(w.abs()), spec)
    layer = PackedNMLinear(in_f, out_f, spec, bias=True, dtype=dtype)
    for name in ("values", "positions", "scales"):
        t = getattr(packed, name)
        if t is not None:
            getattr(layer, f"nm_{name}").copy_(t)
    layer.bias.data.normal_()
    return layer.cuda()


@needs_sm80
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [16, 4])
@pytest.mark.parametrize("shape", [(1024, 2048), (4096, 1024)])
@pytest.mark.parametrize("tokens", [1, 64, 512])
def test_semi_structured_matches_dense(dtype, bits, shape, tokens):
    layer = packed_layer(*shape, bits, dtype)
    x = torch.randn(tokens, shape[1], device="cuda", dtype=dtype)
    # the dispatch measures which path wins (kernels autotune); here: the kernel is a candidate and correct
    assert "semi_structured" in dispatch.candidate_paths(layer, x)
    sparse = dispatch.PATHS["semi_structured"](layer, x)
    dense = dispatch.PATHS["dense"](layer, x)
    assert sparse.shape == dense.shape == (tokens, shape[0])
    assert rel_err(dense.float(), sparse.float()) < 2e-2
    # 3-D inputs (batch, seq, hidden) take the same path
    x3 = x.reshape(1, tokens, shape[1])
    assert torch.equal(layer(x3).reshape(tokens, -1), layer(x))


@needs_sm80
def test_dispatch_falls_back_to_dense_where_the_kernel_cannot_run():
    layer = packed_layer(1024, 2048, 4, torch.float16)
    assert "semi_structured" not in dispatch.candidate_paths(layer, torch.randn(4, 2048, device="cuda", dtype=torch.float32))
    odd = packed_layer(1000, 2048, 16, torch.float16)  # 1000 rows: not a multiple of the kernel tile
    assert dispatch.choose_path(odd, torch.randn(4, 2048, device="cuda", dtype=torch.float16)) == "dense"
    cpu = PackedNMLinear(2048, 1024, NMSpec(bits=16, group_size=None), dtype=torch.float16)
    assert dispatch.choose_path(cpu, torch.randn(4, 2048, dtype=torch.float16)) == "dense"


@needs_sm80
def test_loaded_model_on_cuda_matches_dense_path(tmp_path, input_ids):
    hf_sparse.export(ast_model("llama"), tmp_path / "e", bits=4, group_size=32, dtype=torch.float16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "e", dtype=torch.float16, device_map="cuda")
    ids = input_ids.cuda()
    with torch.no_grad():
        auto = model(ids).logits.float()
        dispatch.FORCE_PATH = "dense"
        try:
            dense = model(ids).logits.float()
        finally:
            dispatch.FORCE_PATH = None
    assert rel_err(dense, auto) < 2e-2
