"""PEFT LoRA on a loaded hf_sparse export: ``merge_and_unload()`` that keeps the N:M mask.

A loaded export's targets are :class:`~hf_sparse.modules.PackedNMLinear`; PEFT wraps them in its generic
``lora.Linear``, whose merge writes ``weight.data`` (a dequantized view here, which refuses the write with an error
naming the two ways below). PEFT's documented hook for layer types it does not know is
``LoraConfig._register_custom_module({base_type: lora_layer_type})``; :func:`register_packed_lora` registers
:class:`PackedNMLoraLinear` for ``PackedNMLinear``::

    config = hf_sparse.integrations.peft_lora.register_packed_lora(LoraConfig(r=8, target_modules=[...]))
    lora = get_peft_model(loaded_export, config)
    ...                                            # train
    merged = lora.merge_and_unload()               # W + M ⊙ BA written into the packed tensors: still 2:4, still packed

The registration lives on the config object only (PEFT does not save it): when loading a saved adapter pass
``config=register_packed_lora(LoraConfig.from_pretrained(adapter_dir))`` to ``PeftModel.from_pretrained``.
:func:`hf_sparse.merge_lora_keep_mask` does the same merge for any LoRA model, registered or not.

Where it differs from PEFT's dense merge:

* ``merge`` adds ``M ⊙ ΔW``: the part of ``ΔW = B·A·scaling`` on pruned positions is dropped (the layer stays N:M),
  so merged outputs differ from the unmerged LoRA forward by that part. 16-bit exports round the kept values to
  their stored dtype; int8/int4 exports are re-rounded with RTN (new scales, same spec).
* ``safe_merge=True`` checks ``W + M ⊙ ΔW`` (fp32) and the merged bias for NaN/inf before anything is written.
* ``unmerge`` restores the packed tensors saved at merge time (exact, not ``W - ΔW`` re-rounded); the copy (the
  layer's packed size) is held while merged and dropped by ``merge_and_unload``/``unload``.
* LoRA variants (DoRA, ...) train and run, but merging them into a packed layer raises a ``ValueError``.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

from ..modules.packed_linear import PACKED_TENSORS, PackedNMLinear

__all__ = ["PackedNMLoraLinear", "register_packed_lora"]


class PackedNMLoraLinear(LoraLinear):
    """PEFT's ``lora.Linear`` over a :class:`PackedNMLinear`; merge/unmerge write the packed tensors (mask kept)."""

    def _packed_base(self) -> PackedNMLinear:
        base = self.get_base_layer()
        if not isinstance(base, PackedNMLinear):  # registered for PackedNMLinear only
            raise TypeError(f"PackedNMLoraLinear wraps a PackedNMLinear, got {type(base).__name__}")
        return base

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge the active adapters as ``W + M ⊙ ΔW`` (see the module docstring for how this differs from PEFT)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self._packed_base()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            if name in self.lora_variant:
                raise ValueError(
                    f"merge: adapter {name!r} is a LoRA variant ({type(self.lora_variant[name]).__name__}); merging a "
                    f"variant into a packed N:M layer ({base.extra_repr()}) is not supported: keep it unmerged"
                )
            delta = self.get_delta_weight(name).detach().to(torch.float32)
            mask = base.nm_mask()
            new_bias = None
            if self.lora_bias[name]:
                if base.bias is None:
                    raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
                new_bias = base.bias.detach() + self.lora_B[name].bias.detach() * self.scaling[name]
            if safe_merge:
                merged = base.dequantized_weight(torch.float32) + delta * mask
                if not torch.isfinite(merged).all() or (new_bias is not None and not torch.isfinite(new_bias).all()):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            snapshot = {k: getattr(base, k).clone() for k in PACKED_TENSORS if getattr(base, k, None) is not None}
            if new_bias is not None:
                snapshot["bias"] = base.bias.detach().clone()
            self._premerge_packed[name] = snapshot
            base.add_masked_delta_(delta, mask)
            if new_bias is not None:
                with torch.no_grad():
                    base.bias.copy_(new_bias.to(base.bias.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the packed tensors (and bias) each merged adapter found, newest first: exact."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self._packed_base()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            snapshot = self._premerge_packed.pop(name, None)
            if snapshot is None:
                continue
            with torch.no_grad():
                for key, saved in snapshot.items():
                    getattr(base, key).copy_(saved)
            base._kernel_cache.clear()

    @property
    def _premerge_packed(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.__dict__.setdefault("_hf_sparse_premerge", {})

    def __repr__(self) -> str:
        return "hf_sparse." + super().__repr__()


def register_packed_lora(config: LoraConfig) -> LoraConfig:
    """Register :class:`PackedNMLoraLinear` for PackedNMLinear targets in ``config`` (PEFT's custom-module hook).

    Returns ``config`` so it composes: ``get_peft_model(model, register_packed_lora(LoraConfig(...)))``.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"register_packed_lora: argument `config` must be a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({PackedNMLinear: PackedNMLoraLinear})
    return config
