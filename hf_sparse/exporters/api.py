"""``hf_sparse.export`` and ``hf_sparse.fake_quantize``: from an AST model to packed N:M safetensors.

Accepted inputs: an AST ``PeftModel`` (read without merging: masks and SLoRB come from the AST layers and
the caller's model is left untouched), a merged model (``SparseLinear`` modules carry SLoRB; plain
linears must already be N:M sparse), or a checkpoint directory (an AST adapter or a merged model).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..atomic import atomic_directory, check_output_directory
from ..calibration import as_model_inputs
from ..format import (
    POSITIONS, SCALES, SLORB_KEYS, SLORB_PROJECTION, SLORB_WEIGHT, VALUES, ZEROS, NMSpec, canonical_slorb_suffix,
    dtype_name,
)
from ..load_guard import add_load_guard
from ..modules import SLoRB, SparseLinear
from ..quantization import PackedWeight, get_quantization_method
from ..quantization.config import HfSparseConfig
from ..sparsity.nm import is_nm_sparse, nm_mask
from ..targets import TargetSelector, matches
from ..tuners.ast.experts import ParamWrapper
from ..tuners.ast.layer import ASTLayer
from .experts import ExpertSource, collect_sparse_experts, expert_tensors, fake_quantize_experts, pack_experts
from .model_card import write_model_card
from .provenance import check_adapter_base, save_tokenizer, source_defaults
from .writer import write_json, write_shards

logger = logging.getLogger(__name__)

__all__ = [
    "export", "fake_quantize", "collect_sparse_linears", "collect_hessians", "SparseSource", "PreparedExport",
    "prepare_export", "pack_sources", "dense_state_dict", "load_for_export",
]


@dataclass
class SparseSource:
    """One N:M linear to export, in ``[out, in]`` layout whatever the module type."""

    name: str
    module: nn.Module  # the module whose inputs calibration hooks observe
    weight: torch.Tensor  # [out, in], pruned entries may be non-zero (AST keeps them); the mask decides
    mask: torch.Tensor  # bool [out, in], exactly N:M along in
    bias: Optional[torch.Tensor]
    slorb: Optional[SLoRB]
    conv1d: bool


def _unwrap_peft(model: nn.Module) -> tuple[nn.Module, bool]:
    """(the transformers model inside, whether it carries AST layers)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        PeftModel = ()  # type: ignore
    if isinstance(model, PeftModel):
        inner = model.base_model.model
        if not any(isinstance(m, (ASTLayer, ParamWrapper)) for m in inner.modules()):
            raise TypeError(
                "export: argument `model` is a PeftModel without AST layers; merge other adapters first "
                "(hf_sparse.merge_lora_keep_mask for a LoRA on a sparse model)"
            )
        return inner, True
    return model, any(isinstance(m, ASTLayer) for m in model.modules())


def _weight_mask(weight_out_in: torch.Tensor, n: int, m: int) -> torch.Tensor:
    w = weight_out_in.detach()
    return nm_mask(w.abs().float() + (w != 0).float(), n, m, dim=1)


def collect_sparse_linears(
    model: nn.Module, n: int = 2, m: int = 4, targets: Optional[list[str]] = None
) -> tuple[nn.Module, list[SparseSource]]:
    """Find the N:M linears of ``model`` (AST layers, SparseLinear, or N:M-sparse Linear/Conv1D).

    ``targets`` follows :mod:`hf_sparse.targets` (str regex, or a list of names/suffixes); ``None``: every AST layer /
    SparseLinear, and the N:M linears among AST's default targets.
    """
    inner, has_ast = _unwrap_peft(model)
    explicit = targets is not None
    selector = TargetSelector(target_modules=targets, exclude_modules=[] if explicit else None)
    sources: list[SparseSource] = []
    if has_ast:
        for name, layer in inner.named_modules():
            if not isinstance(layer, ASTLayer):
                continue
            adapter = next(a for a in layer.active_adapters if a in layer.ast_mask)
            ln, lm = layer.ast_nm[adapter]
            if (ln, lm) != (n, m):
                raise ValueError(f"{name}: AST pattern {ln}:{lm} differs from export arguments n={n}, m={m}")
            base = layer.get_base_layer()
            conv = layer.fan_in_fan_out
            w = base.weight.detach()
            mask = layer.ast_mask[adapter]
            slorb = layer.ast_slorb[adapter] if adapter in layer.ast_slorb else None
            sources.append(
                SparseSource(name, layer, w.t() if conv else w, mask.t() if conv else mask, base.bias, slorb, conv)
            )
        if explicit:
            sources = [s for s in sources if matches(s.name, targets, "targets")]
        return inner, sources

    for name, module in inner.named_modules():
        if isinstance(module, SparseLinear):
            conv = module.fan_in_fan_out
            w = module.weight.detach().t() if conv else module.weight.detach()
            if explicit and not selector.is_target(name):
                continue
            if not is_nm_sparse(w, n, m, dim=1):
                raise ValueError(f"{name}: SparseLinear weight is not {n}:{m} sparse along the input dimension")
            sources.append(SparseSource(name, module, w, _weight_mask(w, n, m), module.bias, module.slorb, conv))
            continue
        if not isinstance(module, (nn.Linear, Conv1D)) or not name:
            continue
        if not selector.is_target(name):
            continue
        conv = isinstance(module, Conv1D)
        w = module.weight.detach().t() if conv else module.weight.detach()
        if w.shape[1] % m or not is_nm_sparse(w, n, m, dim=1):
            if explicit:
                raise ValueError(
                    f"{name}: argument `targets` names a module whose weight is not {n}:{m} sparse along the input "
                    f"dimension; prune or train it first (hf_sparse.oneshot / AST)"
                )
            logger.warning("%s is not %d:%d sparse: exported dense", name, n, m)
            continue
        sources.append(SparseSource(name, module, w, _weight_mask(w, n, m), module.bias, None, conv))
    if not sources:
        raise ValueError(
            f"export: no {n}:{m} sparse linear layer found in {type(inner).__name__} (argument `targets`={targets!r}); "
            f"prune or train with AST first, or pass an AST PeftModel"
        )
    return inner, sources


@torch.no_grad()
def collect_hessians(model: nn.Module, sources: list[SparseSource], calibration_data: Any) -> dict[str, torch.Tensor]:
    """``X^T X`` of every source module's input over the calibration batches (forward hooks, one pass).

    One pass through the (sparse, unquantized) model, all targets at once: simple and fine for small and
    medium models. hf_sparse.oneshot's sequential layer-by-layer calibration is the memory-lean route.
    """
    hessians: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def make_hook(name: str):
        def hook(_module, args, _kwargs=None):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            h = hessians.get(name)
            hessians[name] = x.t() @ x if h is None else h.add_(x.t() @ x)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    for s in sources:
        hooks.append(s.module.register_forward_pre_hook(make_hook(s.name)))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for batch in tqdm(as_model_inputs(calibration_data), desc="GPTQ calibration", leave=False):
            model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    missing = [s.name for s in sources if s.name not in hessians]
    if missing:
        raise RuntimeError(f"GPTQ calibration saw no inputs for {missing[:3]}...: is `calibration_data` empty?")
    return {k: v / counts[k] for k, v in hessians.items()}


def _slorb_spec(sources: list[SparseSource]) -> Optional[dict[str, Any]]:
    slorbs = [s.slorb for s in sources if s.slorb is not None]
    if not slorbs:
        return None
    if len(slorbs) != len(sources):
        missing = [s.name for s in sources if s.slorb is None][:3]
        raise ValueError(f"export: SLoRB present on some targets but not on {missing}...; all or none are supported")
    ks = {sl.k for sl in slorbs}
    if len(ks) != 1:
        raise ValueError(f"export: SLoRB group sizes differ across targets ({sorted(ks)})")
    return {"group_size": ks.pop(), "train_projection": any(sl.projection is not None for sl in slorbs)}


@dataclass
class PreparedExport:
    """What every export path needs: the unwrapped model, its N:M linears, the spec they are stored with, and the
    config that lands in ``config.json`` (the one :class:`HfSparseConfig`, exact targets filled in)."""

    inner: nn.Module
    sources: list[SparseSource]
    spec: NMSpec
    model_dtype: torch.dtype
    config: HfSparseConfig
    experts: list[ExpertSource] = dataclasses.field(default_factory=list)  # fused MoE expert parameters (N:M)


def prepare_export(model: nn.Module, config: HfSparseConfig, dtype: Optional[torch.dtype] = None) -> PreparedExport:
    """Find the sources and build/validate the spec (errors name the module and argument) before any work."""
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"export: argument `dtype` must be None, torch.float16, torch.bfloat16 or torch.float32 (the storage dtype "
            f"of the dense rest), got {dtype!r}; quantize the N:M weights with `bits` instead"
        )
    inner, sources = collect_sparse_linears(model, config.n, config.m, config.targets)
    mdtype = dtype or model_dtype_of(inner)
    values_dtype = config.values_dtype
    if values_dtype is None:
        store = dtype if dtype in (torch.float16, torch.bfloat16) else mdtype
        values_dtype = dtype_name(store if store in (torch.float16, torch.bfloat16) else torch.float16)
    experts = collect_sparse_experts(inner, config.n, config.m)
    spec = config.spec_for([s.name for s in sources], values_dtype=values_dtype, slorb=_slorb_spec(sources),
                           expert_targets=[e.name for e in experts])
    for s in sources:
        spec.check_shape(s.weight.shape[1], s.name)
    for e in experts:
        spec.check_shape(e.weight.shape[2], e.name)
    return PreparedExport(inner, sources, spec, mdtype, config.written(spec), experts)


def pack_sources(
    model: nn.Module, sources: list[SparseSource], spec: NMSpec, method: str, calibration_data: Any
) -> dict[str, PackedWeight]:
    """Pack every source with the registered quantization ``method`` (:mod:`hf_sparse.quantization.registry`)."""
    quantizer = get_quantization_method(method)
    hessians: dict[str, torch.Tensor] = {}
    if quantizer.needs_calibration and spec.bits < 16:
        if calibration_data is None:
            raise ValueError(f"argument `calibration_data` is required for method={method!r} (token ids or batches)")
        hessians = collect_hessians(model, sources, calibration_data)
    packed = {}
    for s in tqdm(sources, desc=f"packing {spec.n}:{spec.m} int{spec.bits}" if spec.bits < 16 else "packing", leave=False):
        packed[s.name] = quantizer.pack(s.weight, s.mask, spec, hessians.pop(s.name, None))
    return packed


def source_paths(*models: Any) -> list[Path]:
    """Local directories the model was read from (its ``name_or_path``, a PEFT base/adapter): never overwritten."""
    paths = []
    for model in models:
        candidates = [getattr(getattr(model, "config", None), "_name_or_path", None)]
        for cfg in (getattr(model, "peft_config", None) or {}).values():
            candidates.append(getattr(cfg, "base_model_name_or_path", None))
        candidates.append(getattr(model, "_hf_sparse_source_path", None))
        paths += [Path(c) for c in candidates if c and Path(str(c)).exists()]
    return paths


def model_dtype_of(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def load_for_export(path: Path) -> nn.Module:
    """Load an AST adapter directory (base + adapter) or a merged checkpoint (restoring SLoRB branches)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    if (path / "adapter_config.json").exists():  # PEFT's own loader: base model from the adapter config, then the adapter
        from peft import AutoPeftModelForCausalLM

        check_adapter_base(path)  # a clear error, not the Hub asked for "None/config.json"
        peft_model = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype="auto")
        peft_model._hf_sparse_source_path = str(path)
        return peft_model
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto")
    slorb_tensors: dict[str, dict[str, torch.Tensor]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                for suffix in SLORB_KEYS:  # today's names and version 1's slorb.S/X
                    if key.endswith("." + suffix):
                        module_name = key[: -len(suffix) - 1]
                        slorb_tensors.setdefault(module_name, {})[canonical_slorb_suffix(suffix)] = f.get_tensor(key)
    for name, tensors in slorb_tensors.items():
        module = model.get_submodule(name)
        conv = isinstance(module, Conv1D)
        in_f, out_f = (module.weight.shape if conv else module.weight.shape[::-1])
        slorb_weight = tensors[SLORB_WEIGHT]
        slorb = SLoRB(in_f, out_f, in_f // slorb_weight.shape[1], train_projection=SLORB_PROJECTION in tensors)
        with torch.no_grad():
            slorb.weight.copy_(slorb_weight)
            if SLORB_PROJECTION in tensors:
                slorb.projection.copy_(tensors[SLORB_PROJECTION])
        model.set_submodule(name, SparseLinear(module.weight, module.bias, slorb.to(module.weight.dtype), conv))
    model._hf_sparse_source_path = str(path)
    return model.eval()


def dense_state_dict(inner: nn.Module, targets: list[str], dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """State dict of everything that stays dense, tied duplicates removed, AST wrappers unwrapped."""
    prefixes = tuple(t + "." for t in targets)
    tied = set(getattr(inner, "all_tied_weights_keys", {}) or {})
    state = {}
    for key, value in inner.state_dict().items():
        if key.startswith(prefixes) or key in tied:
            continue
        while ".base_layer." in key:  # nested wrappers (two AST expert ParamWrappers on one experts module)
            key = key.replace(".base_layer.", ".")
        if key in targets or any(part.startswith("ast_") for part in key.split(".")):
            continue  # packed fused expert parameters, and the expert wrappers' masks
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[key] = value
    return state


def export(
    model: Union[nn.Module, str, Path],
    out_dir: Union[str, Path],
    quantization_config: Optional[HfSparseConfig] = None,
    *,
    calibration_data: Any = None,
    dtype: Optional[torch.dtype] = None,
    tokenizer: Any = None,
    card: Optional[dict[str, Any]] = None,
    max_shard_size: int = 5 * 1024**3,
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Write ``model`` as packed N:M (+ quantized) safetensors that ``AutoModelForCausalLM.from_pretrained`` loads.

    Args:
        model: an AST PeftModel, a merged model, or a checkpoint directory of either.
        out_dir: written atomically (temp dir beside it, then rename); an earlier export there survives failures.
            An existing ``out_dir`` is replaced only if it is empty or a previous hf_sparse output, or with
            ``overwrite=True``; never when it is the source, contains it, or is the current directory or a parent.
        quantization_config: an :class:`HfSparseConfig` (N:M, bits, group size, symmetric, method, targets); the
            same object lands in ``config.json`` and the loader reads it back. Or pass its fields as keywords
            (``bits=4, group_size=128, method="gptq"``), which override the config's.
        calibration_data: token ids or batches, for ``method="gptq"``.
        dtype: storage dtype of the dense rest (embeddings, norms, lm_head, biases, SLoRB); None keeps the model's.
        tokenizer: saved beside the weights: a tokenizer, or the directory / hub id to take it from; None takes the
            source directory's (or its base model's) when ``model`` is a path.
        card: model card fields (see :func:`hf_sparse.exporters.model_card.render_model_card`); a card is always
            written. When ``model`` is a path, what the source recorded (base model, method, recipe) fills the rest.
    """
    config = HfSparseConfig.from_options(quantization_config, **options)
    if isinstance(model, (str, Path)):  # the source's tokenizer and provenance come along
        tokenizer, card = source_defaults(Path(model), tokenizer, card)
        model = load_for_export(Path(model))
    prep = prepare_export(model, config, dtype)
    inner, sources, spec, model_dtype = prep.inner, prep.sources, prep.spec, prep.model_dtype
    local_sources = source_paths(model, inner)
    check_output_directory(Path(out_dir).resolve(), overwrite, local_sources)  # refuse before the slow packing
    packed = pack_sources(model, sources, spec, config.method, calibration_data)

    tensors = dense_state_dict(inner, spec.targets + spec.expert_targets, dtype)
    tensors.update(expert_tensors(pack_experts(prep.experts, spec, config.method)))
    for s in sources:
        p = packed[s.name]
        tensors[f"{s.name}.{VALUES}"] = p.values
        tensors[f"{s.name}.{POSITIONS}"] = p.positions
        if p.scales is not None:
            tensors[f"{s.name}.{SCALES}"] = p.scales
        if p.zeros is not None:
            tensors[f"{s.name}.{ZEROS}"] = p.zeros
        if s.bias is not None:
            tensors[f"{s.name}.bias"] = s.bias.detach().to(dtype or s.bias.dtype)
        if s.slorb is not None:
            tensors[f"{s.name}.{SLORB_WEIGHT}"] = s.slorb.weight.detach().to(dtype or s.slorb.weight.dtype)
            if s.slorb.projection is not None:
                projection = s.slorb.projection
                tensors[f"{s.name}.{SLORB_PROJECTION}"] = projection.detach().to(dtype or projection.dtype)

    model_config = copy.deepcopy(inner.config)
    model_config.quantization_config = prep.config.to_dict()
    model_config.dtype = model_dtype
    with atomic_directory(out_dir, overwrite=overwrite, sources=local_sources, writer="hf_sparse.export") as tmp:
        write_shards(tensors, tmp, max_shard_bytes=max_shard_size)
        model_config.save_pretrained(tmp)
        add_load_guard(tmp / "config.json")  # plain transformers refuses it, naming hf_sparse (load_guard.py)
        generation_config = getattr(inner, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)  # a tokenizer object, or the directory / hub id it comes from
        card = dict(card or {})
        card.setdefault("quant_method", config.method if spec.bits < 16 else "rtn")
        if card.get("recipe") is not None:
            write_json(card["recipe"], tmp / "hf_sparse_recipe.json")
        write_model_card(tmp, spec, model_config, **card)
    return Path(out_dir)


@torch.no_grad()
def fake_quantize(
    model: nn.Module,
    quantization_config: Optional[HfSparseConfig] = None,
    *,
    calibration_data: Any = None,
    dtype: Optional[torch.dtype] = None,
    **options: Any,
) -> nn.Module:
    """The in-memory twin of :func:`export` (same config and options): target weights replaced by the exact
    dequantized N:M weights. A PeftModel is merged (``merge_and_unload``) first; the result computes what the loaded
    export computes.
    """
    config = HfSparseConfig.from_options(quantization_config, **options)
    prep = prepare_export(model, config, dtype)
    inner, sources, spec = prep.inner, prep.sources, prep.spec
    packed = pack_sources(model, sources, spec, config.method, calibration_data)
    packed_experts = pack_experts(prep.experts, spec, config.method)
    if inner is not model or any(isinstance(mod, ASTLayer) for mod in inner.modules()):
        inner = model.merge_and_unload() if hasattr(model, "merge_and_unload") else inner
    for s in sources:
        module = inner.get_submodule(s.name)
        dense = packed[s.name].dense(spec, torch.float32)
        module.weight.data.copy_((dense.t() if s.conv1d else dense).to(module.weight.dtype))
    fake_quantize_experts(inner, prep.experts, packed_experts, spec)
    return inner
