"""ASTModel: the PEFT tuner that finds AST targets, wraps them, and decides what is trainable and saved."""

from __future__ import annotations

import copy
import logging
import re
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, _ExcludedModule
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ...modules.slorb import LEGACY_NAMES as SLORB_LEGACY_NAMES
from ...modules.sparse_linear import SparseLinear
from ...targets import DEFAULT_TARGET_MODULES
from .config import ASTConfig
from .experts import ParamWrapper, expert_param_wrappers
from .layer import ASTLayer, Linear, MaskUpdate, masked_decay_term
from .merged import record_merged_slorb

logger = logging.getLogger(__name__)

from ...targets import SUPPORTED_MODULE_TYPES as SUPPORTED_TYPES  # noqa: E402


def resolve_targets(model: nn.Module, config: ASTConfig) -> list[str]:
    """Qualified names of the modules AST sparsifies, validated; errors name the module and the argument."""
    return _resolve(model, config)[0]


def _resolve(model: nn.Module, config: ASTConfig) -> tuple[list[str], set[str]]:
    """(targets, names the exclude patterns removed), by the one selector (:mod:`hf_sparse.targets`)."""
    return _resolve_selection(model, config)[:2]


def _resolve_selection(model: nn.Module, config: ASTConfig) -> tuple[list[str], set[str], list[str]]:
    """(target modules, names the excludes removed, targeted expert parameters); logs what stays dense."""
    selection = config.target_selector().select(model)
    _log_dense_parameters(model, selection.modules, selection.parameters)
    return selection.modules, selection.excluded, selection.parameters


_PEFT_MODEL_PREFIX = "base_model.model."


def _policy_trains(name: str, policy: Union[str, list[str]]) -> bool:
    """Whether ``ASTConfig.trainable_non_target`` trains the parameter ``name`` (named as in the wrapped model)."""
    if policy == "all":
        return True
    if policy == "none":
        return False
    name = name.removeprefix(_PEFT_MODEL_PREFIX)  # the same answer from the PeftModel and from the tuner's model
    return any(re.fullmatch(p, name) or re.search(p, name) for p in policy)


def _owned_elsewhere(model: nn.Module) -> tuple[set[str], set[str]]:
    """(AST layer names, PEFT auxiliary wrapper names, e.g. modules_to_save): their parameters are not policy ones."""
    layers, aux = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, (ASTLayer, ParamWrapper)):
            layers.add(name)
        elif isinstance(module, AuxiliaryTrainingWrapper):
            aux.add(name)
    return layers, aux


def _under(name: str, prefixes: set[str]) -> bool:
    return any(name.startswith(p + ".") for p in prefixes)


def _policy_parameters(model: nn.Module, config: ASTConfig) -> Iterator[tuple[str, nn.Parameter]]:
    """The non-target parameters that ``config.trainable_non_target`` trains: by the config, not by requires_grad."""
    layers, aux = _owned_elsewhere(model)
    for name, param in model.named_parameters():
        if not _under(name, layers | aux) and _policy_trains(name, config.trainable_non_target):
            yield name, param


def _log_dense_parameters(model: nn.Module, targets: list[str], parameters: Sequence[str] = ()) -> None:
    """Log the sparsified share of all parameters and of decoder-block weights, and which decoder-block weight
    matrices stay dense (e.g. routers)."""
    target_set, param_set = set(targets), set(parameters)
    dense = []
    sparse_numel = decoder_numel = 0
    for name, module in model.named_modules():
        in_decoder = bool(re.fullmatch(DEFAULT_TARGET_MODULES, name or ""))
        for pname, param in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            hit = full in param_set or (name in target_set and pname == "weight")
            sparse_numel += param.numel() if hit else 0
            if in_decoder and param.dim() >= 2 and not pname.endswith("bias"):  # gpt-oss: [E, out] expert biases
                decoder_numel += param.numel()
                if not hit and name not in target_set:
                    dense.append(f"{full} {tuple(param.shape)} ({type(module).__name__})")
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "AST sparsifies %.1f%% of all parameters and %.1f%% of the decoder-block weight parameters (%d modules, %d "
        "fused expert parameters)", 100.0 * sparse_numel / max(total, 1), 100.0 * sparse_numel / max(decoder_numel, 1),
        len(target_set), len(param_set),
    )
    if dense:
        shown = ", ".join(dense[:6]) + (f", ... ({len(dense)} in all)" if len(dense) > 6 else "")
        logger.warning(
            "AST leaves these weight matrices inside decoder blocks dense: %s. Routers are tiny and routing-critical; "
            "fused MoE expert tensors are sparsified through `target_parameters` (None: all of them).",
            shown,
        )


def _current_slorb_key(key: str) -> str:
    """``<module>.ast_slorb.S`` (hf_sparse 0.1) -> ``<module>.ast_slorb.weight``; other keys unchanged."""
    head, _, last = key.rpartition(".")
    if head.endswith("ast_slorb") and last in SLORB_LEGACY_NAMES:
        return f"{head}.{SLORB_LEGACY_NAMES[last]}"
    return key


class ASTModel(BaseTuner):
    """Creates an AST (Adaptive Sparse Trainer) model from a transformers model; see :class:`ASTConfig`."""

    prefix: str = "ast_"
    tuner_layer_cls = ASTLayer
    target_module_mapping: dict = {}

    # ---- target selection ----
    def _prepare_adapter_config(self, peft_config: ASTConfig, model_config: dict) -> ASTConfig:
        # targets are resolved against the model in _prepare_model, on a copy: the saved config keeps the user's
        # `target_parameters` (None = the experts found at load time), PEFT's injection gets the resolved names
        return copy.copy(peft_config)

    def _prepare_model(self, peft_config: ASTConfig, model: nn.Module) -> None:
        targets, excluded, parameters = _resolve_selection(model, peft_config)
        self._ast_targets, self._ast_excluded = set(targets), excluded
        peft_config.target_parameters = list(parameters)  # PEFT's _inject_parameters wraps them (ParamWrapper)

    def _check_target_module_exists(self, peft_config: ASTConfig, key: str):  # type: ignore[override]
        if key in getattr(self, "_ast_excluded", ()):
            return _ExcludedModule()  # lets PEFT's bookkeeping know exclude_modules did its job
        return key in getattr(self, "_ast_targets", ())

    def _check_new_adapter_config(self, config: ASTConfig) -> None:
        super()._check_new_adapter_config(config)
        if len(self.peft_config) > 1:
            raise ValueError("ASTModel supports one AST adapter per model: the masks apply to the shared dense weight.")

    def _create_and_replace(
        self,
        peft_config: ASTConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        parameter_name = kwargs.get("parameter_name")
        if parameter_name is not None:  # a fused expert tensor (PEFT's target_parameters): one wrapper per parameter
            if isinstance(target, ParamWrapper) and target.parameter_name == parameter_name:
                target.update_layer(adapter_name, peft_config, current_key)
                return
            new_module = ParamWrapper(target, adapter_name, peft_config, parameter_name, module_name=current_key)
            self._replace_module(parent, target_name, new_module, target)
            return
        if isinstance(target, ASTLayer):
            target.update_layer(adapter_name, peft_config, current_key)
            return
        if isinstance(target, SparseLinear):  # a SparseConv1D is a Conv1D: AST would drop its SLoRB branch
            raise TypeError(
                f"{current_key}: argument `target_modules` matched a merged AST layer ({type(target).__name__}, with "
                f"a SLoRB branch); AST cannot train it again. Load the unmerged adapter instead: "
                f"PeftModel.from_pretrained(base_model, adapter_dir, is_trainable=True)"
            )
        if not isinstance(target, SUPPORTED_TYPES):
            raise TypeError(
                f"{current_key}: argument `target_modules` matched a {type(target).__name__}; AST supports "
                f"nn.Linear and Conv1D"
            )
        new_module = Linear(target, adapter_name, peft_config, module_name=current_key)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        setattr(parent, child_name, new_module)
        if hasattr(child, "base_layer"):
            child = child.base_layer
        if not isinstance(new_module, ASTLayer):  # unloading: nothing to move
            return
        weight = child.weight
        meta = torch.device("meta")
        for name, module in new_module.named_modules():
            # a branch created under low_cpu_mem_usage lives on meta until the adapter's weights are loaded
            if self.prefix in name and not any(p.device == meta for p in module.parameters()):
                module.to(weight.device)

    # ---- trainability: AST trains the dense target weights themselves ----
    # What AST trains (and so saves) is the target weights and biases, SLoRB, and the non-target parameters that
    # `trainable_non_target` names. What trains *now* (requires_grad) is a separate, switchable state: frozen when the
    # adapter is loaded for inference (PeftModel.from_pretrained's default), toggled by set_requires_grad.
    def _ast_config(self) -> ASTConfig:
        return next(iter(self.peft_config.values()))

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        config = self._ast_config()
        train = not config.inference_mode
        layers, aux = _owned_elsewhere(model)
        for name, param in model.named_parameters():
            if not _under(name, aux):  # PEFT's modules_to_save wrappers manage their own parameters
                param.requires_grad = train and _policy_trains(name, config.trainable_non_target)
        for name in layers:
            module = model.get_submodule(name)
            module._set_base_requires_grad(train)
            for slorb in module.ast_slorb.values():
                slorb.requires_grad_(train)
            for scale in module.ast_cast_scale.values():  # schedule="progressive"
                scale.requires_grad_(train and config.cast_scales)

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """PEFT's toggle over everything AST trains: target weights/biases and SLoRB (in the layers), the
        ``trainable_non_target`` parameters, and modules_to_save."""
        super().set_requires_grad(adapter_names=adapter_names, requires_grad=requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        if names & set(self.peft_config):
            for _, param in _policy_parameters(self.model, self._ast_config()):
                param.requires_grad = requires_grad

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        if inference_mode:
            for _, param in _policy_parameters(self.model, self._ast_config()):
                param.requires_grad = False

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Masks and SLoRB (PEFT's default) plus the trained dense weights: they are the adapter of AST.

        The weights saved are those the config trains (target weights/biases, ``trainable_non_target``), whatever
        their current requires_grad (an adapter loaded for inference is frozen but saves the same file), plus any
        parameter a user unfroze. PEFT's auxiliary wrappers (modules_to_save) are left to PEFT, which saves them once.
        """
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        layers, aux = _owned_elsewhere(model)
        saved = {name for name, p in model.named_parameters() if p.requires_grad}
        saved |= {name for name, _ in _policy_parameters(model, config)}
        for name in layers:
            for pname, _ in model.get_submodule(name).get_base_layer().named_parameters():
                saved.add(f"{name}.base_layer.{pname}")
        for key, value in state_dict.items():
            if key in saved and not _under(key, aux):
                to_return[key] = value
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's key remapping, then the saved base-model weights are copied into the existing parameters here.

        Under ``low_cpu_mem_usage`` PEFT loads with ``load_state_dict(assign=True)``, which would replace those
        parameters with new objects: tied weights (GPT-2's and OPT's lm_head / embeddings) would come apart and the
        model would compute with the stale copy. Copying in place keeps ties and parameter identity; what is left for
        ``load_state_dict`` is the adapter's own tensors (masks, and SLoRB, which is on meta under low_cpu_mem_usage).
        Adapters saved by hf_sparse 0.1 name SLoRB's tensors ``ast_slorb.S``/``ast_slorb.X``: renamed first.
        """
        state_dict = {_current_slorb_key(key): value for key, value in state_dict.items()}
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        params = dict(model.named_parameters())
        layers, _ = _owned_elsewhere(model)
        # the adapter's own parameters (SLoRB; the progressive schedule's scales) go to load_state_dict as PEFT's do
        slorb_prefixes = {f"{name}.{own}" for name in layers for own in ("ast_slorb", "ast_cast_scale")}
        left = {}
        with torch.no_grad():
            for key, value in remapped.items():
                name = key if key in params else key.removeprefix(_PEFT_MODEL_PREFIX)
                param = params.get(name)
                if (param is None or param.device.type == "meta" or param.shape != value.shape
                        or _under(name, slorb_prefixes)):
                    left[key] = value
                else:
                    param.copy_(value)
        return left

    # ---- unloading: a merge that leaves SLoRB branches records them for transformers' from_pretrained ----
    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None):
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        if merge:
            record_merged_slorb(model)
        return model

    # ---- AST helpers used by the trainer and callbacks ----
    def ast_layers(self) -> Iterator[tuple[str, ASTLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, ASTLayer):
                yield name, module

    def ast_expert_layers(self) -> list[tuple[str, ParamWrapper]]:
        """``(qualified parameter name, wrapper)`` of every fused expert parameter AST sparsifies."""
        return expert_param_wrappers(self.model)

    @torch.no_grad()
    def update_masks(self, scores: Optional[dict[str, torch.Tensor]] = None,
                     keep_experts: Optional[dict[str, torch.Tensor]] = None) -> dict[str, MaskUpdate]:
        """Recompute every target's mask (from |W|, or ``scores[name]``); returns the flips per module (and per
        expert parameter, keyed by its qualified name; ``keep_experts[name]`` (bool ``[E]``) freezes those experts)."""
        scores, keep_experts = scores or {}, keep_experts or {}
        out = {name: layer.update_mask(scores.get(name)) for name, layer in self.ast_layers()}
        for name, wrapper in self.ast_expert_layers():
            out[name] = wrapper.update_mask(scores.get(name), keep_experts=keep_experts.get(name))
        return out

    @torch.no_grad()
    def apply_masked_decay(self, lam: float, to_grad: bool = True) -> None:
        """Add ``λ·(¬mask ⊙ W)`` to each target weight's gradient (or subtract it from the weight)."""
        pairs = [(layer.get_base_layer().weight, layer) for _, layer in self.ast_layers()]
        pairs += [(wrapper.get_param(), wrapper) for _, wrapper in self.ast_expert_layers()]
        for weight, layer in pairs:
            term = masked_decay_term(weight, layer.ast_mask[layer.active_adapters[0]], lam)
            if to_grad:
                weight.grad = term.to(weight.dtype) if weight.grad is None else weight.grad.add_(term.to(weight.grad.dtype))
            else:
                weight.data.sub_(term.to(weight.dtype))


def find_ast_model(model: nn.Module) -> tuple["ASTModel", ASTConfig]:
    """The ASTModel (PEFT tuner) inside ``model`` and its config: ``model`` is a PeftModel (``.base_model`` is the
    tuner, as PEFT's ``get_base_model`` convention has it), the tuner itself, or either wrapped by DDP/accelerate
    (unwrapped with accelerate's ``extract_model_from_parallel``)."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    tuner = inner if isinstance(inner, ASTModel) else getattr(inner, "base_model", None)
    if not isinstance(tuner, ASTModel):
        raise TypeError(
            f"AST callbacks need an AST PEFT model (peft.get_peft_model(model, hf_sparse.ASTConfig())), "
            f"got {type(model).__name__}"
        )
    return tuner, next(iter(tuner.peft_config.values()))
