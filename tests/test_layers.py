"""The layers contract: every import of nice_kit (and widgets), type-only and deferred ones included,
points down the layers below, so the modules form no cycle; no module imports another's private
names; Pipeline implements the RunView protocol the analyses are typed against.

    settings
      <- data, models, projection, policy, runs, vectors, influence, distributed, metrics.*
      <- config, warmup, gradients, rollouts
      <- measurements, keys, view                   (what is measured; what stages depend on; RunView)
      <- stages, explain, whatif, diagnostics, export   (typed against view.RunView)
      <- pipeline                                   (the facade: stage verbs, explain, what_if)
      <- evaluation, demo, scenarios, rewards, cli
      <- widgets
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LAYERS: list[set[str]] = [
    {"nice_kit", "nice_kit.settings"},
    {"nice_kit.data", "nice_kit.models", "nice_kit.projection", "nice_kit.policy", "nice_kit.runs", "nice_kit.vectors",
     "nice_kit.influence", "nice_kit.distributed", "nice_kit.memory", "nice_kit.metrics*"},
    {"nice_kit.config", "nice_kit.warmup", "nice_kit.gradients", "nice_kit.rollouts"},
    {"nice_kit.measurements", "nice_kit.keys", "nice_kit.view"},
    {"nice_kit.stages", "nice_kit.explain", "nice_kit.whatif", "nice_kit.diagnostics", "nice_kit.export"},
    {"nice_kit.pipeline"},
    {"nice_kit.evaluation", "nice_kit.demo", "nice_kit.scenarios", "nice_kit.rewards", "nice_kit.cli",
     "nice_kit.__main__"},
    {"widgets*"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in ("nice_kit", "widgets") for p in (ROOT / pkg).rglob("*.py")}


def layer(name: str) -> int:
    for i, names in enumerate(LAYERS):
        for pattern in names:
            if name == pattern or pattern.endswith("*") and (name == pattern[:-1] or name.startswith(pattern[:-1] + ".")):
                return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS in tests/test_layers.py (and the docstring)")


def imports(name: str) -> list[tuple[str, list[str], int]]:
    """(module imported, names imported from it, line) for every import anywhere in the file."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in MODULES else target, [alias.name], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
    return [(t, n, line) for t, n, line in out if t in MODULES and t != name]


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports(m)} for m in MODULES}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_type_only_and_deferred_imports_included():
    assert cycles(graph()) == []


def test_the_cycle_check_finds_a_cycle():
    g = graph()
    g["nice_kit.settings"] = g["nice_kit.settings"] | {"nice_kit.pipeline"}  # what a new upward import would do
    assert any("nice_kit.settings" in c and "nice_kit.pipeline" in c for c in cycles(g))


def test_every_import_points_down_the_layers():
    upward = [f"{MODULES[m].relative_to(ROOT)}:{line}: {m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
              for m in sorted(MODULES) for t, _, line in imports(m) if layer(t) > layer(m)]
    assert not upward, "\n".join(upward)


def test_nice_kit_never_imports_widgets():
    assert not [m for m in MODULES if m.startswith("nice_kit") for t, _, _ in imports(m) if t.startswith("widgets")]


def test_no_module_imports_another_modules_private_names():
    private = [f"{MODULES[m].relative_to(ROOT)}:{line}: {t}.{n}" for m in sorted(MODULES) for t, names, line in imports(m)
               for n in names if n.startswith("_") and not n.startswith("__") and not t.endswith(f".{n}")]
    assert not private, "\n".join(private)


def test_pipeline_implements_the_run_view_the_analyses_use():
    from nice_kit.pipeline import Pipeline
    from nice_kit.view import RunView

    members = {n for n in vars(RunView) if not n.startswith("_")} | set(RunView.__annotations__)
    assert {"cfg", "project_gradients", "with_config"} <= members
    init = ast.unparse(ast.parse((ROOT / "nice_kit" / "pipeline.py").read_text()))
    missing = [n for n in sorted(members) if not hasattr(Pipeline, n) and f"self.{n} =" not in init]
    assert not missing, missing


@pytest.mark.parametrize("module", ["nice_kit.stages", "nice_kit.explain", "nice_kit.whatif", "nice_kit.diagnostics",
                                    "nice_kit.export"])
def test_the_analyses_use_only_the_run_view(module):
    """Every ``run.<member>`` an analysis reads is declared by RunView (the protocol is what they need)."""
    from nice_kit.view import RunView

    declared = {n for n in vars(RunView) if not n.startswith("_")} | set(RunView.__annotations__)
    used = {node.attr for node in ast.walk(ast.parse(MODULES[module].read_text()))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "run"}
    assert used - declared == set()


def test_scripts_import_no_private_name_of_nice_kit():
    """bench/ and scripts/ use nice_kit's public names only (a private one may vanish in a redesign; the
    tests may test internals)."""
    found = []
    for folder in ("bench", "scripts"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nice_kit"):
                    found += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, "\n".join(found)
