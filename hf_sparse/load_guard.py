"""A ``config.json`` entry that makes plain transformers refuse an hf_sparse export instead of loading it wrong.

Without ``import hf_sparse``, transformers meets ``quantization_config.quant_method = "hf_sparse"``, logs "Unknown
quantization type ... we will skip the quantization" and builds a dense model whose decoder linears are missing
from the checkpoint (it holds ``nm_*`` tensors): randomly initialised, garbage generations, no error. No
``quantization_config`` value can make it fail (an unknown method is always a warning), and ``auto_map`` is ignored
when the architecture is built in. ``transformers_weights`` (the checkpoint file named in ``config.json``) is read
after the quantizer is chosen and before any file is opened, and a value that is not a safetensors name is refused
with a ``ValueError`` that quotes it; so the value *is* the message. ``hf_sparse``'s quantizer removes the entry
from the loaded config (:func:`strip_load_guard`) before transformers reads it, so loading with hf_sparse is
unchanged; transformers never writes the entry back (``PretrainedConfig.save_pretrained`` drops it), so a model
saved with ``save_pretrained`` after loading carries no guard; only :func:`hf_sparse.export` writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json

__all__ = ["GUARD_KEY", "GUARD_MESSAGE", "add_load_guard", "has_load_guard", "strip_load_guard"]

GUARD_KEY = "transformers_weights"
#: what plain transformers prints (after "...nor a safetensors index file (*.safetensors.index.json): ")
GUARD_MESSAGE = (
    "this is an hf_sparse 2:4 export: run `pip install hf-sparse` and `import hf_sparse` before from_pretrained "
    "(without it transformers would load random decoder weights)"
)


def add_load_guard(config_json: str | Path) -> None:
    """Write the guard into an export's ``config.json`` (after ``config.save_pretrained``, which drops it)."""
    path = Path(config_json)
    data = json.loads(path.read_text(encoding="utf-8"))
    data[GUARD_KEY] = GUARD_MESSAGE
    atomic_write_json(data, path, indent=2, sort_keys=True)


def has_load_guard(config: Any) -> bool:
    """Whether a transformers config object (or a config.json dict) carries the guard."""
    value = config.get(GUARD_KEY) if isinstance(config, dict) else getattr(config, GUARD_KEY, None)
    return value == GUARD_MESSAGE


def strip_load_guard(config: Any) -> Any:
    """Remove the guard from a loaded transformers config (what hf_sparse's quantizer does before weights resolve)."""
    if has_load_guard(config):
        delattr(config, GUARD_KEY)
    return config
