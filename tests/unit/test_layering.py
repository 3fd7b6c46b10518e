"""The package's layering (docs/ARCHITECTURE.md, "What may import what"), read from the code's own imports,
the lazy ones inside functions included.

Folders by role, lowest first; a module may import its own folder and the folders below it:

    base        sd/__init__.py, sd/cpu.py, sd/log.py
    data        sd/data/
    runtime     sd/runtime/
    components  sd/components/
    kit         sd/kit/
    evaluation  sd/evaluation/
    spine       the other modules at sd/'s root (model, sd_args, sd_trainer, text_image_pair_dataset, ...)
    tools       sd/tools/

Nothing under sd/ imports a top-level script, a benchmark, a script or a test; no module imports itself
back through a circle. ``python -m tests.unit.test_layering`` prints the map (modules per folder, imports).
"""

import ast
import os
from collections import Counter
from typing import Dict, List, Set

from tests.helpers.common import ROOT

LAYERS = ("base", "data", "runtime", "components", "kit", "evaluation", "spine", "tools")
BASE = {"sd", "sd.cpu", "sd.log"}
TOP_LEVEL = ("train_txt2img_laion400m_trainer", "create_pretraining_data", "eval", "benchmarks", "scripts", "tests")


def modules() -> Dict[str, str]:
    """Dotted name → file of every module under sd/."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "sd")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
                found[dotted[: -len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return found


def imported_names(path: str, module: str) -> Set[str]:
    """Every absolute module name ``path`` imports (``from a import b`` gives ``a.b`` when that is a module of
    sd/, else ``a``), at any depth of the file."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    known = modules()
    names = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    names.discard(module)
    return names


def graph() -> Dict[str, List[str]]:
    """sd module → the sd modules it imports."""
    known = modules()
    return {m: sorted(n for n in imported_names(p, m) if n in known) for m, p in known.items()}


def layer(module: str) -> str:
    if module in BASE:
        return "base"
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and os.path.isdir(os.path.join(ROOT, "sd", parts[1]))):
        return parts[1]
    return "spine"


def cycles(edges: Dict[str, List[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_sits_in_a_known_layer():
    assert {layer(m) for m in modules()} <= set(LAYERS), sorted({layer(m) for m in modules()} - set(LAYERS))


def test_imports_point_down_the_layers():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [f"{m} ({layer(m)}) imports {n} ({layer(n)})" for m, targets in graph().items() for n in targets
              if rank[layer(n)] > rank[layer(m)]]
    assert upward == []


def test_nothing_under_sd_imports_a_top_level_script_or_a_test():
    bad = [f"{m} imports {n}" for m, p in modules().items() for n in imported_names(p, m)
           if n.split(".")[0] in TOP_LEVEL]
    assert bad == []


def test_no_import_circles():
    assert cycles(graph()) == []


def test_layer_rules_catch_an_upward_import_and_a_circle():
    """The checks above fail on the mistakes they are for (a graph with both)."""
    edges = {"sd.data.formats": ["sd.model"], "sd.model": ["sd.data.formats"]}
    assert cycles(edges) == [["sd.data.formats", "sd.model"]]
    assert layer("sd.data.formats") == "data" and layer("sd.model") == "spine" and layer("sd.log") == "base"


if __name__ == "__main__":
    g = graph()
    counts = Counter(layer(m) for m in g)
    for name in LAYERS:
        print(f"{name:<11} {counts[name]:>3} modules")
    print(f"{len(g)} modules, {sum(len(v) for v in g.values())} imports between them, circles: {cycles(g)}")
