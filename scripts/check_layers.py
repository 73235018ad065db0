"""Walk hf_sparse's imports (module-level and inside functions) and fail on a cycle or an import up the layers.

Run: ``python scripts/check_layers.py`` (exit 1 and a list of problems, or "layers ok"). The order below is the
one the README's Layout section documents; ``tests/test_layers.py`` runs this check and compares the two.
A module may import from its own layer or any layer below it, never above; the package facade
(``hf_sparse/__init__.py``) and every ``cli``/``*_cli`` module are "apps", the top layer.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1] / "hf_sparse"

#: bottom first; a module belongs to the layer of its longest matching prefix (``*.cli`` modules are "apps")
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("atomic", "calibration", "checksum", "format", "linalg", "load_guard", "registry", "sparsity", "targets",
                    "text")),
    ("quantization", ("quantization",)),
    ("kernels", ("kernels",)),
    ("modules", ("modules",)),
    ("oneshot", ("oneshot",)),
    ("tuners", ("tuners",)),
    ("exporters", ("exporters",)),
    ("training", ("training",)),
    ("integrations", ("integrations",)),
    ("evaluation", ("evaluation", "evaluate")),
    ("apps", ("optimum", "assets", "demo", "cli", "chat_eval")),
]


def module_name(path: Path) -> str:
    parts = ("hf_sparse",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def layer_of(module: str) -> Optional[int]:
    if module == "hf_sparse":
        return len(LAYERS) - 1  # the facade, beside the apps (which import it like a user does)
    rel = module.removeprefix("hf_sparse.")
    if rel.split(".")[-1] == "cli" or rel.endswith("_cli"):
        return len(LAYERS) - 1
    best: Optional[tuple[int, int]] = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if rel == prefix or rel.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    return None if best is None else best[0]


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """``{imported hf_sparse module: line}`` (``from pkg import name`` counts as ``pkg.name`` when that is a module)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("hf_sparse"):
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.setdefault(full if full in modules else target, node.lineno)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("hf_sparse"):
                    found.setdefault(alias.name, node.lineno)
    found.pop(module, None)
    return found


def _parents(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def check() -> list[str]:
    modules = all_modules()
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    for module, path in sorted(modules.items()):
        here = layer_of(module)
        if here is None:
            problems.append(f"{module}: in no layer of scripts/check_layers.py's LAYERS (add it)")
            continue
        graph[module] = set()
        for target, line in imports_of(module, path, modules).items():
            there = layer_of(target)
            if there is not None and there > here:
                problems.append(
                    f"{path.relative_to(ROOT.parent)}:{line}: {module} ({LAYERS[here][0]}) "
                    f"imports {target} ({LAYERS[there][0]}), a higher layer"
                )
            if target not in _parents(module):  # a module importing its own package's __init__ is not a cycle
                graph[module].add(target)
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component) + [sorted(component)[0]])

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    problems = check()
    for p in problems:
        print(p)
    print(f"{len(problems)} layer problem(s)" if problems else "layers ok")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
