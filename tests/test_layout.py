"""The package's shape: layers that import one way and no import cycles (read with `ast`,
so imports inside functions count too), and the public entry points still where users
and vLLM look for them."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_griffin"
# Which layer may import which (tools -> engine -> core/ops; ops may use core's math).
ALLOWED = {
    "core": {"core", "ops"},
    "ops": {"ops", "core"},
    "engine": {"engine", "core", "ops"},
    "tools": {"tools", "engine", "core", "ops"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports the submodule when there is one.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] == "vllm_griffin" and n in known)
    return out


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def test_no_import_cycles():
    edges = graph()
    # Tarjan's strongly connected components: any with two or more modules is a cycle.
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert cycles == []


def test_layers_import_one_way():
    wrong = []
    for name, deps in graph().items():
        mine = layer(name)
        if mine is None:  # the package root and its public shims
            continue
        wrong += [f"{name} -> {d}" for d in sorted(deps) if layer(d) and layer(d) not in ALLOWED[mine]]
    assert wrong == []


def test_core_and_ops_never_import_vllm():
    offenders = []
    for name, path in modules().items():
        if layer(name) not in ("core", "ops"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{name}: {n}" for n in names if n.split(".")[0] == "vllm"]
    assert offenders == []


def test_public_entry_points():
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"]["griffin"] == "vllm_griffin:register"
    target = project["scripts"]["vllm-griffin"]
    module, _, attr = target.partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), attr))
    import vllm_griffin
    from vllm_griffin.export import read_experts, write_experts
    from vllm_griffin.models import MODELS, prepare_model

    assert callable(vllm_griffin.register) and callable(prepare_model) and "smollm2-135m-instruct" in MODELS
    assert callable(read_experts) and callable(write_experts)
