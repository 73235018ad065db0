"""Model cards of exports: every export gets a ``README.md`` rendered with :class:`huggingface_hub.ModelCard` from
``hf_sparse/templates/model_card.md`` (package data, read with :mod:`importlib.resources`, so a wheel install can
export). ``ASTTrainer.create_model_card`` uses :func:`create_model_card_for_trainer` so ``Trainer.push_to_hub()`` keeps
the export's card.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml
from huggingface_hub import ModelCard, ModelCardData

from ..format import NMSpec
from .provenance import base_model_license, is_hub_id, write_provenance

__all__ = [
    "TEMPLATE_PATH", "create_model_card_for_trainer", "read_template", "render_model_card", "update_model_card",
    "write_model_card",
]

# the card template ships inside the package (pyproject: [tool.setuptools.package-data])
_TEMPLATE = resources.files("hf_sparse").joinpath("templates", "model_card.md")
TEMPLATE_PATH = Path(str(_TEMPLATE))  # a real file for ordinary installs; read it with read_template()


def read_template() -> str:
    """The default model-card template (Jinja2 Markdown) shipped with the package."""
    return _TEMPLATE.read_text(encoding="utf-8")


def render_model_card(
    spec: NMSpec,
    config: Any = None,
    base_model: Optional[str] = None,
    recipe: Optional[Any] = None,
    token_budget: Optional[int | str] = None,
    evaluation: Optional[list[dict[str, Any]]] = None,
    method: Optional[str] = None,
    repo_id: Optional[str] = None,
    model_name: Optional[str] = None,
    license: Optional[str] = None,
    template_path: Optional[str | Path] = None,
    *,
    quant_method: Optional[str] = None,
    sparsity_method: Optional[str] = None,
    export_format: str = "hf_sparse",
    reexported_from: Optional[str] = None,
) -> ModelCard:
    """Render the card. ``evaluation``: rows ``{"metric": ..., "dense": ..., "sparse": ...}``.

    ``quant_method`` is how the kept values were quantized (``rtn``, ``gptq``), ``sparsity_method`` how the mask was
    found (``AST``, ``sparsegpt (one-shot)``, ...; None: not recorded, and the card says so). ``method`` is the
    old single field: a quantization method name lands in ``quant_method``, anything else in ``sparsity_method``.
    ``export_format`` (``hf_sparse`` / ``compressed-tensors``) picks the "how to load" section.
    """
    if method is not None:
        quant_names = _quantization_method_names()
        if method in quant_names:
            quant_method = quant_method or method
        else:
            sparsity_method = sparsity_method or method
    architecture = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
    base_model = base_model or getattr(config, "_name_or_path", None) or None
    base_model = str(base_model) if base_model else None
    license = license or base_model_license(base_model)  # the base model's own card/config, when readable offline
    if sparsity_method and sparsity_method.lower() == "ast":
        sparsity_method = "AST"
    tags = ["hf_sparse", f"{spec.n}:{spec.m}-sparsity", "semi-structured-sparsity"]
    if spec.bits < 16:
        tags.append(f"int{spec.bits}")
    if export_format == "compressed-tensors":
        tags.append("compressed-tensors")
    card_data = ModelCardData(
        library_name="transformers",
        tags=tags,
        base_model=base_model if is_hub_id(base_model) else None,
        license=license,
        pipeline_tag="text-generation",
    )
    if isinstance(recipe, (dict, list)):
        recipe_text = yaml.safe_dump(recipe, sort_keys=False).strip()
    else:
        recipe_text = str(recipe).strip() if recipe else None
    group_desc = "per-channel scales" if spec.group_size is None else f"group size {spec.group_size}"
    slorb_desc = "none" if spec.slorb is None else f"k={spec.slorb['group_size']}" + (
        ", trained projection" if spec.slorb.get("train_projection") else ""
    )
    if token_budget is not None and isinstance(token_budget, int):
        token_budget = f"{token_budget:,}" if token_budget else "0 (one-shot, no training)"
    if token_budget is None:
        token_budget = "not recorded"
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path) if template_path else None,
        template_str=None if template_path else read_template(),
        model_name=model_name or (repo_id.split("/")[-1] if repo_id else f"{Path(str(base_model or 'model')).name}-{spec.n}of{spec.m}-sparse"),
        n=spec.n,
        m=spec.m,
        bits=spec.bits,
        symmetric=spec.symmetric,
        values_dtype=spec.values_dtype,
        group_desc=group_desc,
        quant_method=quant_method or "rtn",
        method=quant_method or "rtn",  # old templates
        sparsity_method=sparsity_method,
        num_targets=len(spec.targets),
        slorb_desc=slorb_desc,
        architecture=architecture,
        base_model=base_model,
        base_model_is_hub=is_hub_id(base_model),
        license=license,
        recipe=recipe_text,
        token_budget=token_budget,
        evaluation=evaluation or [],
        format_version=spec.format_version,
        export_format=export_format,
        reexported_from=reexported_from,
        repo_id=repo_id,
    )


def _quantization_method_names() -> set[str]:
    from ..quantization import QUANTIZATION_METHODS

    return set(QUANTIZATION_METHODS)


def write_model_card(directory: str | Path, spec: NMSpec, config: Any = None, **fields: Any) -> Path:
    """Render the card into ``directory/README.md`` (called by every export), and its facts into
    :data:`~hf_sparse.exporters.provenance.PROVENANCE_FILE` so that a re-export states the same provenance."""
    path = Path(directory) / "README.md"
    card = render_model_card(spec, config, **fields)
    card.save(str(path))
    facts = {k: fields.get(k) for k in _PROVENANCE_KEYS}
    method = fields.get("method")
    if method is not None and not facts.get("sparsity_method") and method not in _quantization_method_names():
        facts["sparsity_method"] = "AST" if str(method).lower() == "ast" else method
    facts["base_model"] = facts.get("base_model") or card.data.base_model
    facts["export_format"] = fields.get("export_format") or "hf_sparse"
    write_provenance(directory, facts)
    return path


_PROVENANCE_KEYS = ("base_model", "sparsity_method", "quant_method", "token_budget", "recipe", "evaluation", "license",
                    "reexported_from", "export_format")


def create_model_card_for_trainer(trainer: Any, **fields: Any) -> bool:
    """Render the hf_sparse card into ``trainer.args.output_dir`` when it holds an hf_sparse export.

    ``Trainer.push_to_hub()`` calls ``create_model_card()``, which would overwrite the export's card with the
    generic one; a trainer overrides ``create_model_card`` to call this first (and falls back to
    ``super().create_model_card`` when it returns False). The token budget defaults to the trainer's
    ``state.num_input_tokens_seen`` (when tracked).
    """
    out = Path(trainer.args.output_dir)
    config_path = out / "config.json"
    if not config_path.exists():
        return False
    config = json.loads(config_path.read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "hf_sparse":
        return False
    spec = NMSpec.from_dict(qc)
    tokens = getattr(getattr(trainer, "state", None), "num_input_tokens_seen", 0) or None
    if tokens:
        fields.setdefault("token_budget", tokens)
    from .provenance import PROVENANCE_FILE

    recorded = out / PROVENANCE_FILE  # what the export stated (method, base model, license, ...) stays stated
    for key, value in (json.loads(recorded.read_text(encoding="utf-8")) if recorded.is_file() else {}).items():
        fields.setdefault(key, value)
    fields.setdefault("base_model", config.get("_name_or_path") or None)
    known = {"base_model", "recipe", "token_budget", "evaluation", "method", "repo_id", "model_name", "license",
             "template_path", "quant_method", "sparsity_method", "export_format", "reexported_from"}
    write_model_card(out, spec, None, **{k: v for k, v in fields.items() if k in known})
    return True


def update_model_card(directory: str | Path, **fields: Any) -> Path:
    """Re-render an hf_sparse export's card with more facts, e.g. the evaluation a run measures *after* exporting
    (the demo reloads its export, then measures it). What the export recorded fills what ``fields`` leaves out;
    README.md and the provenance file are replaced atomically (same file names: still an unchanged hf_sparse output).
    """
    from types import SimpleNamespace

    from ..atomic import atomic_write_json, atomic_write_text
    from .provenance import PROVENANCE_FILE

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "hf_sparse":
        raise ValueError(f"update_model_card: {directory} is not an hf_sparse export (config.json quant_method "
                         f"{qc.get('quant_method')!r})")
    path = directory / PROVENANCE_FILE
    facts = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    facts.update({k: v for k, v in fields.items() if v is not None})
    render_fields = {k: v for k, v in facts.items() if k in _PROVENANCE_KEYS or k in ("repo_id", "model_name")}
    render_fields.setdefault("quant_method", qc.get("method"))
    card = render_model_card(NMSpec.from_dict(qc), SimpleNamespace(architectures=config.get("architectures")),
                             **render_fields)
    atomic_write_text(str(card), directory / "README.md")
    atomic_write_json({k: v for k, v in facts.items() if v is not None}, path)
    return directory / "README.md"
