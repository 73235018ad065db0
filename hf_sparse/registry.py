"""A name -> implementation registry with a decorator: the one pattern behind pruners, quantization methods and export
formats (compressed-tensors' compressor registry, transformers' quantizer registry)."""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

__all__ = ["Registry"]

_T = TypeVar("_T")


class Registry(dict):
    """``registry.register(name)`` decorates a class or function; ``registry.get_entry(name)`` fails naming the argument.

    Args:
        kind: what is registered, for messages ("one-shot pruner").
        argument: the user-facing argument that takes these names ("method", "--format").
        name_attribute: if set, the registered object gets its name under this attribute (``cls.method = name``).
    """

    def __init__(self, kind: str, argument: str, name_attribute: Optional[str] = None) -> None:
        super().__init__()
        self.kind, self.argument, self.name_attribute = kind, argument, name_attribute

    def register(self, name: str) -> Callable[[_T], _T]:
        def wrap(obj: _T) -> _T:
            if name in self and self[name] is not obj:
                raise ValueError(f"a {self.kind} named {name!r} is already registered ({getattr(self[name], '__name__', self[name])})")
            if self.name_attribute:
                setattr(obj, self.name_attribute, name)
            self[name] = obj
            return obj

        return wrap

    def get_entry(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise ValueError(
                f"argument `{self.argument}`={name!r} is not a known {self.kind}; choose one of {sorted(self)}"
            ) from None
