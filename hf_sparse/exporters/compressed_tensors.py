"""Interop: write an N:M export as an ordinary compressed-tensors checkpoint (zeros included).

For engines without 2:4 kernels (vLLM, plain transformers with compressed-tensors): bits 8/4 become a
``pack-quantized`` int checkpoint whose scales/zero-points are exactly ours (codes shifted to the signed
range compressed-tensors uses: ``q = code - 2**(bits-1)``), so the dequantized weights equal the hf_sparse
ones bit for bit; pruned weights are stored as the zero-point (dequantizing to exactly 0). bits=16 is a
plain dense checkpoint. The packing itself is done by compressed-tensors' own compressor, so the file
layout follows whatever version is installed (``pip install hf-sparse[interop]``).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..atomic import atomic_directory, check_output_directory
from ..format import NMSpec
from ..quantization.config import HfSparseConfig
from .api import dense_state_dict, pack_sources, prepare_export, source_paths
from .model_card import write_model_card
from .provenance import save_tokenizer
from .writer import write_shards

logger = logging.getLogger(__name__)

__all__ = ["export_compressed_tensors"]


def _require_compressed_tensors():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "--format compressed-tensors needs the compressed-tensors package: pip install 'hf-sparse[interop]'"
        ) from err


def _ct_config(spec: NMSpec, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    strategy = "channel" if spec.group_size is None else "group"
    args = QuantizationArgs(
        num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy=strategy, group_size=spec.group_size
    )
    scheme = QuantizationScheme(targets=[f"re:^{t.replace('.', '[.]')}$" for t in targets], weights=args)
    return QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized")


@torch.no_grad()
def export_compressed_tensors(
    model: nn.Module,
    out_dir: str | Path,
    quantization_config: Optional[HfSparseConfig] = None,
    *,
    calibration_data: Any = None,
    dtype: Optional[torch.dtype] = None,
    card: Optional[dict[str, Any]] = None,
    overwrite: bool = False,
    tokenizer: Any = None,
    **options: Any,
) -> Path:
    """Write a compressed-tensors (``bits`` 8/4) or dense (``bits`` 16) checkpoint of the N:M model.

    Same config and options as :func:`hf_sparse.export`; an existing ``out_dir`` is treated the same way.
    """
    config = HfSparseConfig.from_options(quantization_config, **options)
    bits, symmetric, method = config.bits, config.symmetric, config.method
    prep = prepare_export(model, config, dtype)
    inner, sources, spec, model_dtype = prep.inner, prep.sources, prep.spec, prep.model_dtype
    if prep.experts:  # its schemes quantize Linear modules by name; a fused [E, ., .] parameter is not one
        raise ValueError(
            f"--format compressed-tensors cannot express the N:M fused MoE expert parameter {prep.experts[0].name} "
            f"({len(prep.experts)} in all): compressed-tensors targets Linear modules. Export with --format hf_sparse, "
            "or train with ASTConfig(target_parameters=[]) to keep the experts dense"
        )
    local_sources = source_paths(model, inner)
    check_output_directory(Path(out_dir).resolve(), overwrite, local_sources)
    if spec.slorb is not None:
        raise ValueError(
            "--format compressed-tensors cannot carry SLoRB branches (no such layer in compressed-tensors/vLLM); "
            "export with --format hf_sparse, or train without use_slorb"
        )
    conv = [s.name for s in sources if s.conv1d]
    if conv and bits < 16:
        raise ValueError(
            f"--format compressed-tensors quantizes nn.Linear only; {conv[0]} is a GPT-2 Conv1D. Use bits=16 "
            f"(dense with zeros) or --format hf_sparse"
        )
    if bits < 16 and spec.group_size is not None:
        ragged = [s for s in sources if s.weight.shape[1] % spec.group_size]
        if ragged:
            raise ValueError(
                f"--format compressed-tensors needs in_features divisible by argument `group_size`={spec.group_size}; "
                f"{ragged[0].name} has {ragged[0].weight.shape[1]} inputs. Choose a divisor (e.g. 64 for 576) or "
                f"per-channel scales (group_size=None)"
            )
    packed = pack_sources(model, sources, spec, method, calibration_data)
    state = dense_state_dict(inner, spec.targets, dtype)
    for s in sources:
        dense = packed[s.name].dense(spec, torch.float32)
        dense = dense.t() if s.conv1d else dense
        state[f"{s.name}.weight"] = dense.to(model_dtype)
        if s.bias is not None:
            state[f"{s.name}.bias"] = s.bias.detach().to(dtype or s.bias.dtype)

    config = copy.deepcopy(inner.config)
    config.dtype = model_dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    compressor = None
    if bits < 16 and not symmetric:
        logger.warning(
            "asymmetric pack-quantized checkpoints are valid compressed-tensors (vLLM, ModelCompressor load them), "
            "but transformers 5.x + compressed-tensors 0.20 fail to load them (zero-points are not packed on the "
            "meta device); use symmetric=True for transformers"
        )
    if bits < 16:
        _require_compressed_tensors()
        state, compressor = _compress(state, spec, sources, packed, model_dtype)
    with atomic_directory(out_dir, overwrite=overwrite, sources=local_sources, writer="hf_sparse.compressed_tensors") as tmp:
        write_shards(state, tmp)
        config.save_pretrained(tmp)
        if compressor is not None:
            compressor.update_config(str(tmp))
        generation_config = getattr(inner, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        card = dict(card or {})
        card.setdefault("quant_method", method)
        card["export_format"] = "compressed-tensors"  # the card says how to load *this* format
        write_model_card(tmp, spec, config, **card)
    return Path(out_dir)


def _compress(state: dict[str, torch.Tensor], spec: NMSpec, sources, packed, model_dtype):
    """Run compressed-tensors' own pack-quantized compressor on each target with our scales/zero-points."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.base import compress_module
    from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config

    qconfig = _ct_config(spec, [s.name for s in sources])
    holder = nn.Module()  # a shell with one Linear per target, named as in the model
    for s in sources:
        out_f, in_f = s.weight.shape
        parent = holder
        *path, leaf = s.name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        lin = nn.Linear(in_f, out_f, bias=False, dtype=model_dtype)
        lin.weight.data.copy_(state[f"{s.name}.weight"])
        parent.add_module(leaf, lin)
    apply_quantization_config(holder, qconfig, show_progress=False)
    offset = 2 ** (spec.bits - 1)
    for s in sources:
        lin = holder.get_submodule(s.name)
        p = packed[s.name]
        lin.weight_scale.data.copy_(p.scales.to(torch.float32).to(lin.weight_scale.dtype).reshape(lin.weight_scale.shape))
        if hasattr(lin, "weight_zero_point"):
            if p.zeros is None:
                lin.weight_zero_point.data.zero_()
            else:
                lin.weight_zero_point.data.copy_((p.zeros.to(torch.float32) - offset).reshape(lin.weight_zero_point.shape))
        compress_module(lin)
    compressor = ModelCompressor.from_pretrained_model(holder, quantization_format="pack-quantized")
    compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
    for s in sources:
        del state[f"{s.name}.weight"]
        for key, value in holder.get_submodule(s.name).state_dict().items():
            state[f"{s.name}.{key}"] = value
    return state, compressor
