"""FSDP2 (``torch.distributed.fsdp.fully_shard``) support for ASTTrainer: sharded masks, local recompute, the teacher.

FSDP2 shards every parameter along dim 0 (output rows) with ``torch.chunk`` semantics, so each rank holds whole
rows and an N:M mask along the input dim is computable from the local shard alone. The masks follow the weight:

- **Masks are sharded like the weights** (:func:`shard_ast_masks`): ``ast_mask`` and ``ast_initial_mask`` become
  ``DTensor`` buffers with the weight's mesh and ``Shard(0)`` placement, so a rank stores 1/world of them. A replicated
  bool mask costs 1 byte per target weight per rank (2 with the initial mask): 13 GB per GPU at 7B, 130 GB at 70B,
  more than the whole sharded training state (docs/training.md, "Sharded training (FSDP2)").
- Inside the FSDP forward the weight is the gathered full tensor: ``masked_weight_ste`` all-gathers the mask
  (``DTensor.full_tensor()``, 1 byte per weight, transient, one layer at a time). Outside forward everything works on
  ``.to_local()`` rows: the recompute (:func:`update_masks_local`, flips all-reduced), the masked-decay AdamW and the
  metrics.
- A placement other than ``Shard(0)`` on a 1-D mesh (``shard_placement_fn`` choosing ``Shard(1)``, HSDP meshes) or a
  fan-in-fan-out weight (GPT-2's ``Conv1D``: dim 0 is the input dim, so N:M groups would straddle ranks) is refused.
- Fused MoE expert parameters (``[E, ., .]``, :mod:`hf_sparse.tuners.ast.experts`) shard on dim 0 = the expert index,
  so each rank holds whole experts (5 experts on 2 ranks: 3 + 2) and their ``[E, ., .]`` masks are sharded the same
  way; N:M groups run along an expert's input dim (1 or 2), never across ranks. The recompute scores the local
  experts only; per-expert activation sums and routed-token counts are kept for all experts on every rank (tokens
  are routed to any expert), all-reduced, then sliced to the local experts. An experts module that is itself
  ``fully_shard``-ed is refused (its weight would still be sharded when the wrapper builds ``W ⊙ mask``).

Checkpoints are sharded (:func:`use_sharded_checkpoints`: every rank writes its rows through accelerate's
``torch.distributed.checkpoint`` path, resume reads them back onto the same shards); the final model is gathered
once onto rank 0 and written as an ordinary AST adapter (:func:`save_full_model`, what ``save_model()`` does).

On CPU accelerate never enables FSDP (``AcceleratorState`` only switches accelerator device types to
``DistributedType.FSDP``; ``MULTI_CPU`` keeps the plugin's request and silently trains DDP).
:func:`enable_fsdp2_on_cpu` makes the same switch accelerate makes for GPUs, so the Trainer then takes its ordinary
FSDP2 path (``Accelerator.prepare`` -> ``fsdp2_prepare_model``, DTensor-aware clipping, no DDP wrapper).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
from torch import nn

from ..sparsity.nm import nm_mask

logger = logging.getLogger(__name__)

__all__ = [
    "FSDP2_CONFIG_HINT",
    "distributed_mode",
    "enable_fsdp2_on_cpu",
    "fsdp_requested",
    "is_sharded",
    "local",
    "local_rows",
    "save_full_model",
    "shard_ast_masks",
    "shard_teacher",
    "update_masks_local",
    "use_sharded_checkpoints",
]

FSDP2_CONFIG_HINT = (
    "Use FSDP2: TrainingArguments(fsdp=True, fsdp_config={\"version\": 2, "
    "\"transformer_layer_cls_to_wrap\": [\"LlamaDecoderLayer\"]}), or an accelerate config with "
    "`distributed_type: FSDP` and `fsdp_config: {fsdp_version: 2, fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP, "
    "fsdp_reshard_after_forward: true}` (recipes/accelerate/fsdp2-8gpu.yaml)"
)


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: Any) -> bool:
    return isinstance(t, _dtensor_cls())


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (shares its storage: in-place edits reach the DTensor), else ``t`` itself."""
    return t.to_local() if isinstance(t, _dtensor_cls()) else t


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def fsdp_requested(args: Any) -> Optional[int]:
    """The FSDP version the arguments or the launch environment ask for (None: no FSDP)."""
    if getattr(args, "fsdp", None):
        config = getattr(args, "fsdp_config", None) or {}
        if isinstance(config, dict):
            version = config.get("version", config.get("fsdp_version"))
            if version is None:
                plugin_args = getattr(args, "fsdp_plugin_args", None) or {}
                version = plugin_args.get("fsdp_version", 2)
            return int(version)
        return 2  # a JSON path: transformers reads it in __post_init__ (fsdp_plugin_args holds the version then)
    if _env_true("ACCELERATE_USE_FSDP"):
        return int(os.environ.get("FSDP_VERSION", "1"))  # accelerate's own default when the variable is absent
    return None


def enable_fsdp2_on_cpu(trainer: Any) -> bool:
    """Switch a multi-process CPU (gloo) accelerator from DDP to FSDP2 when FSDP2 was asked for; True if switched.

    Raises instead of training DDP when FSDP was asked for and accelerate did not enable it on another device.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    args = trainer.args
    if trainer.is_fsdp_enabled or fsdp_requested(args) is None:
        return False
    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or state.num_processes < 2:
        raise RuntimeError(
            f"ASTTrainer: FSDP was requested but accelerate did not enable it (distributed type "
            f"{state.distributed_type}, {state.num_processes} process(es)); refusing to train unsharded. Launch with "
            "one process per device (torchrun / accelerate launch)."
        )
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    plugin = FullyShardedDataParallelPlugin(**plugin_args) if plugin_args else FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise NotImplementedError(f"ASTTrainer supports FSDP2 only. {FSDP2_CONFIG_HINT}")
    if trainer.accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(trainer.accelerator.mixed_precision)
    # what AcceleratorState.__init__ does for accelerator device types (accelerate/state.py)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    logger.info("ASTTrainer: FSDP2 enabled on %d CPU processes (gloo)", state.num_processes)
    return True


def distributed_mode(trainer: Any) -> str:
    """One line for the training log: the mode (FSDP2 / DDP / single), the world size, backend and device.

    Says plainly what a launch really gave (``accelerate launch --num_processes 2 --cpu`` without ``--multi_cpu``
    starts one process, silently)."""
    accelerator = trainer.accelerator
    world = accelerator.num_processes
    mode = "FSDP2" if getattr(trainer, "is_fsdp2", False) else ("DDP" if world > 1 else "single")
    backend = torch.distributed.get_backend() if torch.distributed.is_available() and \
        torch.distributed.is_initialized() else "none"
    return f"ASTTrainer: distributed mode {mode}, world size {world} (backend {backend}, device {accelerator.device})"


# ---- checkpoints: sharded while training, the final model once as a full state dict ----
def use_sharded_checkpoints(plugin: Any, args: Any = None) -> None:
    """Make the Trainer's checkpoints sharded (``torch.distributed.checkpoint``: every rank writes its own rows of
    the weights, masks and Adam moments, nothing is gathered), whatever ``state_dict_type`` says.

    transformers defaults ``fsdp_config["state_dict_type"]`` to ``FULL_STATE_DICT``, which gathers the whole
    model and optimizer on rank 0 at every save (~16 bytes per parameter: 1.1 TB at 70B) and, for a PEFT model
    with row-sharded mask buffers, does not write a loadable adapter. Resume reads the sharded checkpoint back
    through accelerate's ``load_fsdp_model`` / ``load_fsdp_optimizer`` onto the same shards; the final model is
    written once, gathered, by :func:`save_full_model`.
    """
    from torch.distributed.fsdp import StateDictType

    if getattr(args, "save_only_model", False):  # transformers refuses it with SHARDED_STATE_DICT too
        raise ValueError(
            "ASTTrainer under FSDP2: `save_only_model=True` is not supported: checkpoints are sharded "
            "(SHARDED_STATE_DICT) and hold the model state with the optimizer's; drop save_only_model and call "
            "trainer.save_model() for the full model"
        )
    if plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT:
        return
    logger.info("ASTTrainer under FSDP2: checkpoints are sharded (SHARDED_STATE_DICT, was %s); save_model() "
                "writes the final model as a full state dict", plugin.state_dict_type)
    plugin.state_dict_config = plugin.optim_state_dict_config = None  # re-derived for the new type
    plugin.set_state_dict_type("SHARDED_STATE_DICT")


def save_full_model(trainer: Any, output_dir: str) -> None:
    """Gather the full state dict (one tensor at a time, onto rank 0's CPU) and write it once, like a
    single-process run: an AST adapter directory (``adapter_model.safetensors``: trained weights, full masks,
    SLoRB) that ``hf_sparse.export`` / ``hf-sparse export`` and ``PeftModel.from_pretrained`` take as they are.

    Collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # only rank 0 receives the tensors
    state = get_model_state_dict(trainer.model, options=options)
    if trainer.args.should_save:
        trainer._save(output_dir, state_dict=state)
    del state
    trainer.accelerator.wait_for_everyone()


# ---- masks: sharded like their weights ----
def _local_rows(n: int, mesh: Any) -> slice:
    """The rows ``Shard(0)`` gives this rank (``torch.chunk`` semantics: ceil(n/world) rows each, the tail shorter)."""
    world, rank = mesh.size(), mesh.get_local_rank()
    size = -(-n // world)
    start = min(rank * size, n)
    return slice(start, min(start + size, n))


def local_rows(t: torch.Tensor) -> slice:
    """The dim-0 indices of ``t`` this rank holds: its ``Shard(0)`` rows (experts) for a DTensor, else all."""
    if not isinstance(t, _dtensor_cls()):
        return slice(0, t.shape[0])
    return _local_rows(t.shape[0], t.device_mesh)


def _check_placement(name: str, layer: Any, weight: Any) -> None:
    from torch.distributed.tensor import Shard

    if weight.device_mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise NotImplementedError(
            f"ASTTrainer under FSDP2: {name}.weight is placed {tuple(weight.placements)} on a "
            f"{weight.device_mesh.ndim}-D mesh; AST needs Shard(0) (whole output rows per rank) on a 1-D mesh, so "
            "that N:M groups along the input dim stay on one rank. Drop the custom shard_placement_fn / HSDP mesh."
        )
    if layer.input_dim == 0:
        raise NotImplementedError(
            f"ASTTrainer under FSDP2: {name} is a fan-in-fan-out layer (Conv1D, weight [in, out]); FSDP2 shards dim 0, "
            "the input dim its N:M groups run along. Train it with DDP."
        )


def _check_expert_placement(name: str, wrapper: Any, weight: Any) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import Shard

    if weight.device_mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise NotImplementedError(
            f"ASTTrainer under FSDP2: the fused MoE expert parameter {name} is placed {tuple(weight.placements)} on a "
            f"{weight.device_mesh.ndim}-D mesh; AST needs Shard(0) (whole experts per rank) on a 1-D mesh, so that "
            f"N:M groups along each expert's input dim {wrapper.input_dim} stay on one rank. Drop the custom "
            "shard_placement_fn / HSDP mesh, or pass ASTConfig(target_parameters=[])."
        )
    experts = wrapper.get_base_layer()
    if isinstance(experts, FSDPModule):
        raise NotImplementedError(
            f"ASTTrainer under FSDP2: the experts module holding {name} ({type(experts).__name__}) is fully_shard-ed "
            "on its own, so its weight is still sharded when AST builds W ⊙ mask; wrap the decoder layer instead "
            "(drop the experts class from transformer_layer_cls_to_wrap)"
        )


def shard_ast_masks(ast_model: Any) -> int:
    """Turn every AST layer's masks into DTensors laid out like its (FSDP2-sharded) weight; returns how many."""
    from torch.distributed.tensor import DTensor

    targets = []
    for name, layer in ast_model.ast_layers():
        weight = layer.get_base_layer().weight
        if not isinstance(weight, DTensor):
            raise RuntimeError(f"ASTTrainer under FSDP2: {name}.weight was not sharded (no fully_shard above it)")
        _check_placement(name, layer, weight)
        targets.append((name, layer, weight))
    for name, wrapper in ast_model.ast_expert_layers():  # fused [E, ., .] experts: Shard(0) = whole experts
        weight = wrapper.get_param()
        if not isinstance(weight, DTensor):
            raise RuntimeError(f"ASTTrainer under FSDP2: {name} was not sharded (no fully_shard above it)")
        _check_expert_placement(name, wrapper, weight)
        targets.append((name, wrapper, weight))
    count = 0
    for name, layer, weight in targets:
        rows = _local_rows(weight.shape[0], weight.device_mesh)
        for store in (layer.ast_mask, layer.ast_initial_mask):
            for adapter in list(store.keys()):
                mask = store[adapter]
                if isinstance(mask, DTensor):
                    continue
                shard = mask[rows].to(weight.device).contiguous()
                if shard.shape != weight.to_local().shape:
                    raise RuntimeError(f"{name}: mask shard {tuple(shard.shape)} != weight shard "
                                       f"{tuple(weight.to_local().shape)}")
                store[adapter] = DTensor.from_local(shard, weight.device_mesh, weight.placements,
                                                    run_check=False, shape=mask.shape, stride=mask.stride())
                count += 1
    return count


@torch.no_grad()
def update_masks_local(ast_model: Any, scores: Optional[dict[str, torch.Tensor]],
                       keep_experts: Optional[dict[str, torch.Tensor]] = None) -> tuple[int, int, int]:
    """Recompute every target's mask on its local rows / experts (``scores[name]``: local, or |W_local|);
    ``keep_experts[name]`` (bool, the local experts) leaves those experts' masks as they are.

    Returns (flipped vs previous, flipped vs initial, numel), summed over ranks (one all-reduce).
    """
    keep_experts = keep_experts or {}
    totals = torch.zeros(3, dtype=torch.float64)
    targets = [(name, layer, layer.get_base_layer().weight) for name, layer in ast_model.ast_layers()]
    targets += [(name, wrapper, wrapper.get_param()) for name, wrapper in ast_model.ast_expert_layers()]
    for name, layer, full_weight in targets:
        adapter = layer.active_adapters[0]
        n, m = layer.ast_nm[adapter]
        weight = local(full_weight)
        score = weight.detach().abs() if scores is None or name not in scores else scores[name]
        old = local(layer.ast_mask[adapter])
        if score.shape != old.shape:
            raise ValueError(f"{name}: local score {tuple(score.shape)} != local mask {tuple(old.shape)}")
        if old.numel() == 0:  # fewer experts than ranks: this rank holds none of them
            continue
        new = nm_mask(score, n, m, dim=layer.input_dim)
        keep = keep_experts.get(name)
        if keep is not None:
            if keep.shape[0] != old.shape[0]:
                raise ValueError(f"{name}: keep_experts has {keep.shape[0]} entries, this rank holds "
                                 f"{old.shape[0]} experts")
            keep = keep.to(new.device)
            new[keep] = old[keep]
        totals[0] += int((new != old).sum())
        totals[1] += int((new != local(layer.ast_initial_mask[adapter])).sum())
        totals[2] += new.numel()
        old.copy_(new)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    return int(totals[0]), int(totals[1]), int(totals[2])


# ---- the teacher: sharded per decoder layer, frozen, resharded after every forward ----
def shard_teacher(teacher: nn.Module, layer_cls_names: Optional[list[str]], mp_policy: Any = None,
                  mesh: Any = None) -> nn.Module:
    """``fully_shard`` each decoder layer of the frozen teacher, then its root, all with ``reshard_after_forward``.

    The root needs ``reshard_after_forward=True`` explicitly: FSDP2's default (None) keeps the root gathered after
    a forward, and the teacher only ever runs no-grad forwards (no backward would free it).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(teacher, FSDPModule):
        return teacher
    names = set(layer_cls_names or getattr(teacher, "_no_split_modules", None) or [])
    kwargs = {"reshard_after_forward": True, "mp_policy": mp_policy or MixedPrecisionPolicy(), "mesh": mesh}
    wrapped = 0
    for module in list(teacher.modules()):
        if module is not teacher and type(module).__name__ in names:
            fully_shard(module, **kwargs)
            wrapped += 1
    if names and not wrapped:
        raise ValueError(f"ASTTrainer: no teacher module of class {sorted(names)} to shard")
    fully_shard(teacher, **kwargs)
    return teacher
