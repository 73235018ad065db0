"""Local lm-eval (0.4.x) task files run on an in-memory model, offline: :func:`lm_eval_tasks`.

Needs the ``eval`` extra (``pip install 'hf-sparse[eval]'``); lm-eval is imported only when called.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .windows import DeviceLike, _EvalMode, _prepare

__all__ = ["lm_eval_tasks"]


def lm_eval_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    task_yaml_or_dir: str,
    tasks: Optional[list[str]] = None,
    batch_size: int = 8,
    limit: Optional[int] = None,
    device: DeviceLike = None,
    num_fewshot: Optional[int] = None,
) -> dict[str, dict[str, Any]]:
    """Run LOCAL lm-eval (0.4.x) task files on an in-memory model, offline; returns lm-eval's ``results``.

    ``task_yaml_or_dir``: one task YAML (its ``task:`` name is run) or a folder of them (``tasks`` picks names;
    default: every task defined there). Needs the ``eval`` extra: ``pip install 'hf-sparse[eval]'``.
    """
    import os

    try:
        import lm_eval  # the lm-eval package (absolute import), not this module
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(
            "hf_sparse.evaluation.lm_eval_tasks needs lm-eval 0.4.x: pip install 'hf-sparse[eval]' "
            f"(or pip install 'lm-eval>=0.4'); import failed: {err}"
        ) from err
    import yaml

    path = os.path.abspath(task_yaml_or_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"argument `task_yaml_or_dir`={task_yaml_or_dir!r} does not exist")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(path) for f in names if f.endswith((".yaml", ".yml")))
    defined = []
    for file in files:
        with open(file, encoding="utf-8") as fh:
            spec = yaml.load(fh, Loader=yaml.BaseLoader) or {}  # lm-eval YAMLs may carry !function tags
        if isinstance(spec, dict) and isinstance(spec.get("task"), str):
            defined.append(spec["task"])
    names = list(tasks) if tasks else defined
    if not names:
        raise ValueError(f"no `task:` entries found in {task_yaml_or_dir!r}; pass argument `tasks`")
    dev = _prepare(model, device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(dev))
    manager = TaskManager(include_path=folder, include_defaults=False)
    with _EvalMode(model):
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False)
    return out["results"]
