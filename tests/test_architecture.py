"""The data flow is the architecture: the core's layers only point down, the core never imports an adapter, and
no module imports itself back through others (every import counted, module-level and inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "uniap": ROOT / "shared" / "uniap",
    "uniap.launch_templates": ROOT / "launch_templates",
    "uniap_megatron": ROOT / "uniap_megatron",
    "uniap_deepspeed": ROOT / "uniap_deepspeed",
}
ADAPTERS = ("uniap_megatron", "uniap_deepspeed")
# The core's rooms, bottom first: a module may import its own room and those below it, never one above.
CORE_LAYERS = (
    ("errors", "tolerances", "io", "shell", "launch_templates"),
    ("model",),
    ("cluster",),
    ("profile",),
    ("cost",),
    ("solver",),
    ("plan",),
    ("report",),
    ("planner",),
    ("calibrate", "explain", "conversion", "launch"),
    ("cli", "entry", ""),
)


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            prefix = ".".join(p for p in (base, node.module or "") if p)
            candidates = [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate not in known and "." in candidate:
                candidate = candidate.rsplit(".", 1)[0]
            if candidate in known and candidate != name:
                targets.add(candidate)
    return targets


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def core_layer(module: str) -> int:
    room = module.split(".")[1] if module.count(".") else ""
    return next(i for i, rooms in enumerate(CORE_LAYERS) if room in rooms)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_core_module_has_a_room():
    for module in graph():
        if module.startswith("uniap.") or module == "uniap":
            core_layer(module)  # StopIteration: a new room of the core must be placed in CORE_LAYERS


def test_the_core_never_points_up_or_at_an_adapter():
    wrong = []
    for module, targets in graph().items():
        if module.startswith(ADAPTERS):
            continue
        for target in targets:
            if target.startswith(ADAPTERS) or core_layer(target) > core_layer(module):
                wrong.append(f"{module} -> {target}")
    assert not wrong


def test_no_import_circles():
    assert cycles(graph()) == []


def test_the_checks_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert core_layer("uniap.profile.schema") < core_layer("uniap.planner")
