"""The one target selector: which modules (and, for fused MoE experts, which parameters) become N:M.

Semantics are PEFT's (``peft.tuners.tuners_utils.check_target_module_exists``), so ``target_modules`` means the
same in ``ASTConfig`` and ``LoraConfig``:

- a **str** is a regex matched with ``re.fullmatch`` against the qualified module name;
- a **list** holds exact qualified names or name suffixes (``"q_proj"``, ``"self_attn.q_proj"`` match
  ``model.layers.0.self_attn.q_proj``); ``exclude_modules`` follows the same two rules.
- ``None`` is AST's default: every ``nn.Linear``/``Conv1D`` inside a repeated decoder block, MoE routers excluded.

Before hf_sparse 0.2 a list meant regexes. A list entry that contains regex syntax (``\\ * + ? [ ( | ^ $ {``) and
matches a name only as a regex still works, with a ``FutureWarning`` saying to pass a str regex instead.
``target_parameters`` (names or suffixes of ``nn.Parameter`` s, as PEFT's ``LoraConfig(target_parameters=...)``)
selects fused 3-D expert tensors that are not modules.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = [
    "DEFAULT_EXCLUDE_MODULES", "DEFAULT_TARGET_MODULES", "SUPPORTED_MODULE_TYPES", "Patterns", "TargetSelection",
    "TargetSelector", "matches",
]

logger = logging.getLogger(__name__)

Patterns = Optional[Union[str, Sequence[str]]]

#: every module inside a repeated decoder block ("model.layers.3.mlp.up_proj", "transformer.h.0.attn.c_attn")
DEFAULT_TARGET_MODULES = r".*\.\d+\..*"
#: routers of mixture-of-experts blocks decide where tokens go: tiny and routing-critical, kept dense
DEFAULT_EXCLUDE_MODULES = r".*\.(gate|router|shared_expert_gate)"
SUPPORTED_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)

_REGEX_SYNTAX = re.compile(r"[\\*+?\[\]()|^${}]")
_warned_legacy: set[str] = set()


def _name_or_suffix(entry: str, key: str) -> bool:
    return key == entry or key.endswith("." + entry)


def _legacy_regex(entry: str, key: str, argument: str) -> bool:
    """A pre-0.2 list entry that was a regex: still honoured, with a FutureWarning once per entry."""
    if not _REGEX_SYNTAX.search(entry):
        return False
    try:
        hit = re.fullmatch(entry, key) is not None
    except re.error:
        return False
    if hit and entry not in _warned_legacy:
        _warned_legacy.add(entry)
        warnings.warn(
            f"argument `{argument}`: the list entry {entry!r} matched as a regex. In a list, entries are names or name "
            f"suffixes (PEFT's rule); pass a regex as a str instead, e.g. {argument}={entry!r}. Regex list entries stop "
            "working in a future release.",
            FutureWarning,
            stacklevel=4,
        )
    return hit


def matches(key: str, patterns: Patterns, argument: str = "target_modules") -> bool:
    """Whether ``key`` (a qualified module or parameter name) is selected by ``patterns`` (see the module docstring)."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, key) is not None
    return any(_name_or_suffix(e, key) or _legacy_regex(e, key, argument) for e in patterns)


def _is_adapter_internal(name: str, module: nn.Module) -> bool:
    """Modules PEFT or AST created (wrappers, their base layers, adapter branches) are never targets themselves."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        BaseTunerLayer = ()  # type: ignore[assignment]
    parts = name.split(".")
    return isinstance(module, BaseTunerLayer) or "base_layer" in parts or any(
        p.startswith(("ast_", "lora_")) for p in parts
    )


@dataclass
class TargetSelection:
    """The result: target module names (model order), names the excludes removed, targeted parameter names."""

    modules: list[str] = field(default_factory=list)
    excluded: set[str] = field(default_factory=set)
    parameters: list[str] = field(default_factory=list)


@dataclass
class TargetSelector:
    """``target_modules`` / ``exclude_modules`` / ``target_parameters`` with PEFT's semantics (module docstring).

    ``exclude_modules=None`` means AST's default excludes (MoE routers); pass ``[]`` to exclude nothing.
    ``target_parameters=None`` means the fused expert weights of MoE blocks
    (:func:`hf_sparse.sparsity.experts.default_expert_parameters`); pass ``[]`` to leave them dense.
    """

    target_modules: Patterns = None
    exclude_modules: Patterns = None
    target_parameters: Optional[Sequence[str]] = None
    supported_types: tuple[type[nn.Module], ...] = SUPPORTED_MODULE_TYPES

    @property
    def includes(self) -> Union[str, Sequence[str]]:
        return DEFAULT_TARGET_MODULES if self.target_modules is None else self.target_modules

    @property
    def excludes(self) -> Union[str, Sequence[str]]:
        return DEFAULT_EXCLUDE_MODULES if self.exclude_modules is None else self.exclude_modules

    def is_target(self, name: str) -> bool:
        """Selected by the includes and not removed by the excludes (type not checked)."""
        return (
            matches(name, self.includes, "target_modules")
            and not matches(name, self.excludes, "exclude_modules")
        )

    def select(self, model: nn.Module, require: bool = True) -> TargetSelection:
        """Resolve against ``model``; errors name the argument and the module.

        A user-given pattern that names a module of an unsupported type (e.g. the embedding) is a TypeError;
        no match at all is a ValueError when ``require``.
        """
        found = TargetSelection()
        for name, module in model.named_modules():
            if not name or _is_adapter_internal(name, module):
                continue
            if not matches(name, self.includes, "target_modules"):
                continue
            if matches(name, self.excludes, "exclude_modules"):
                found.excluded.add(name)
                continue
            if isinstance(module, self.supported_types):
                found.modules.append(name)
            elif self.target_modules is not None and not any(isinstance(c, self.supported_types) for c in module.modules()):
                raise TypeError(
                    f"{name}: argument `target_modules` matched a {type(module).__name__}, which AST cannot sparsify "
                    f"(supported: {', '.join(t.__name__ for t in self.supported_types)})."
                )
        if self.target_parameters is None:  # AST's default: the fused MoE expert weights (routers are modules)
            from .sparsity.experts import default_expert_parameters

            found.parameters = [
                p for p in default_expert_parameters(model) if not matches(p.rsplit(".", 1)[0], self.excludes)
            ]
        elif self.target_parameters:
            found.parameters = [
                pname for pname, _ in model.named_parameters()
                if any(_name_or_suffix(e, pname) for e in self.target_parameters)
            ]
        if require and not found.modules and not found.parameters:
            raise ValueError(
                f"argument `target_modules`={self.target_modules!r} (exclude_modules={self.exclude_modules!r}"
                + (f", target_parameters={list(self.target_parameters)!r}" if self.target_parameters else "")
                + f") matched no {'/'.join(t.__name__ for t in self.supported_types)} module of {type(model).__name__}."
            )
        return found
