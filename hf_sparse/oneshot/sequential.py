"""Layer-by-layer one-shot pruning: each decoder layer is calibrated on the outputs of the already-pruned ones.

1. The inputs of decoder layer 0 (hidden states plus the positional args and kwargs the model passes it:
   attention mask, position embeddings/ids, ...) are captured by a forward pre-hook that raises to stop the
   forward (the "Catcher" of the SparseGPT/Wanda code), so the rest of the model never runs.
2. For each layer: hooks feed every target's inputs to its pruner while the layer runs on all calibration
   batches; the targets are pruned; the layer runs again and its outputs AFTER pruning are the next layer's
   inputs. Only one layer's activations (and, with ``device``, one layer's weights) are on the device at once.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Optional

import torch
from torch import nn

from .registry import OneShotPruner

logger = logging.getLogger(__name__)

__all__ = ["find_decoder_layers", "capture_layer_inputs", "prune_sequential"]


class _StopForward(Exception):
    """Raised by the capture hook once decoder layer 0 has been reached."""


def find_decoder_layers(model: nn.Module, target_names: list[str]) -> tuple[str, nn.ModuleList, dict[int, list[str]]]:
    """The ``nn.ModuleList`` of decoder layers holding the targets, and the targets of each layer index.

    The outermost ModuleList whose ``<name>.<i>.`` prefixes the targets wins (MoE expert lists sit inside it).
    """
    modules = dict(model.named_modules())
    lists = sorted((n for n, mod in modules.items() if n and isinstance(mod, nn.ModuleList)), key=len)
    for prefix in lists:
        pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
        per_layer: dict[int, list[str]] = {}
        outside = []
        for name in target_names:
            match = pattern.match(name)
            if match:
                per_layer.setdefault(int(match.group(1)), []).append(name)
            else:
                outside.append(name)
        if per_layer and not outside:
            return prefix, modules[prefix], per_layer
    raise ValueError(
        f"calibrated one-shot pruning processes decoder layers one by one, but the targets {target_names[:4]}"
        f"{'...' if len(target_names) > 4 else ''} are not all inside one nn.ModuleList of decoder layers of "
        f"{type(model).__name__}; restrict argument `target_modules` to modules inside the decoder blocks"
    )


def _move_params(modules: list[nn.Module], device: torch.device) -> None:
    """Move the direct parameters and buffers of ``modules`` (not their children) to ``device``."""
    for mod in modules:
        for key, param in mod._parameters.items():
            if param is not None and param.device != device:
                param.data = param.data.to(device)
        for key, buf in mod._buffers.items():
            if buf is not None and buf.device != device:
                mod._buffers[key] = buf.to(device)


def _outside(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    inside = {id(mod) for mod in layers.modules()}
    return [mod for mod in model.modules() if id(mod) not in inside]


def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor], list[tuple[tuple, dict]]]:
    """Run the model up to decoder layer 0 on each batch; return its hidden-state inputs and other args/kwargs."""
    hidden: list[torch.Tensor] = []
    extras: list[tuple[tuple, dict]] = []

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            hidden.append(args[0])
            extras.append((tuple(args[1:]), dict(kwargs)))
        else:
            kw = dict(kwargs)
            hidden.append(kw.pop("hidden_states"))
            extras.append(((), kw))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                raise RuntimeError(f"{type(model).__name__}: the forward never reached decoder layer 0")
    finally:
        handle.remove()
    return hidden, extras


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def prune_sequential(
    model: nn.Module,
    targets: dict[str, nn.Module],
    make_pruner: Callable[[nn.Module, str], OneShotPruner],
    batches: list[torch.Tensor],
    device: Optional[torch.device] = None,
    restore_pruned: bool = False,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Prune ``targets`` layer by layer with pruners from ``make_pruner(module, name)``; returns keep-masks.

    Args:
        targets: qualified name -> module whose weight is pruned (all inside the decoder-layer list).
        batches: calibration token-id batches (see :func:`hf_sparse.oneshot.calibration.as_batches`).
        device: where layers run (``None``: where the model is). With another device, the modules outside the
            decoder layers move there for the capture and each layer moves there while it is processed; all move
            back afterwards.
        restore_pruned: after a layer's outputs were computed, put the original values back into its pruned
            weight entries (kept entries keep the pruner's values). Used by the AST initialiser: the next layers
            still see pruned outputs, but AST's dense weights keep the values the STE may bring back.
    """
    from tqdm.auto import tqdm

    if not batches:
        raise ValueError("calibrated one-shot pruning needs calibration data: argument `calibration_ids` is empty")
    prefix, layers, per_layer = find_decoder_layers(model, list(targets))
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    offload = device != home
    outside = _outside(model, layers) if offload else []
    was_training = model.training
    model.eval()
    masks: dict[str, torch.Tensor] = {}
    try:
        if offload:
            _move_params(outside, device)
        hidden, extras = capture_layer_inputs(model, layers, batches, device)
        if offload:
            _move_params(outside, home)
        last = max(per_layer)
        for index in tqdm(range(last + 1), desc=f"one-shot {prefix}", unit="layer", disable=not progress):
            layer = layers[index]
            if offload:
                layer.to(device)
            names = per_layer.get(index, [])
            pruners = {name: make_pruner(targets[name], name) for name in names}
            originals = {name: targets[name].weight.detach().clone() for name in names} if restore_pruned else {}
            handles = [
                targets[name].register_forward_hook(lambda mod, inp, out, p=pruner: p.add_batch(inp[0]))
                for name, pruner in pruners.items()
            ]
            try:
                if names:
                    for h, (args, kwargs) in zip(hidden, extras):
                        layer(h, *args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            for name, pruner in pruners.items():
                masks[name] = pruner.prune()
                pruner.free()
                if pruner.num_tokens == 0:
                    logger.warning("%s: no calibration token reached this module; pruned by magnitude", name)
            if index < last:
                hidden = [_first(layer(h, *args, **kwargs)) for h, (args, kwargs) in zip(hidden, extras)]
            for name, original in originals.items():
                weight = targets[name].weight
                weight.data.copy_(torch.where(masks[name], weight.data, original))
            if offload:
                layer.to(home)
                for name in names:
                    masks[name] = masks[name].to(home)
    finally:
        model.train(was_training)
        if offload:
            _move_params(outside, home)
    return masks
