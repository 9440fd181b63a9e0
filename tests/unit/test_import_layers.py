"""The package map holds: every import between subpackages points down, and no module imports itself back.

Read from the source with ``ast`` (imports inside functions included), so a lazy import counts as an arrow too.
docs/architecture.md draws the same map.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import slmstack

SRC = Path(slmstack.__file__).parent
CORE = "core"  # the top-level modules (errors, io, config, models, arch, formats, ...)
# what each part may import; the root package (the lazy public API) may import anything and nothing imports it
ALLOWED = {
    CORE: set(),
    "engine": {CORE},
    "retrieval": {CORE},
    "pruning": {CORE},
    "stack": {CORE, "engine", "retrieval"},
    "evaluation": {CORE, "engine", "retrieval", "stack"},
    "training": {CORE, "engine", "retrieval", "stack"},
    "federated": {CORE, "engine", "pruning", "stack", "training"},
    "transfer": {CORE, "engine", "evaluation", "stack", "training"},
    "study": {CORE, "engine", "evaluation", "retrieval", "stack", "training"},
    "serving": {CORE, "engine", "stack"},
    "export": {CORE, "stack"},
    "cli": {CORE, "engine", "evaluation", "export", "federated", "pruning", "retrieval", "serving", "stack", "study",
            "training", "transfer"},
}  # fmt: skip
ROOT = "slmstack"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The subpackage a module belongs to, ``core`` for a top-level module, ``slmstack`` for the root package."""
    if module == ROOT:
        return ROOT
    name = module.split(".")[1]
    return name if (SRC / name).is_dir() else CORE


def import_edges() -> dict[str, set[str]]:
    """Module -> the slmstack modules it imports (by name, any level of the file)."""
    modules = {module_name(p) for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        here = module_name(path)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            targets |= {n for n in names if n in modules and n != here}
        edges[here] = targets
    return edges


def back_arrows(edges: dict[str, set[str]]) -> list[str]:
    """Imports that point up or sideways in the map, as ``module -> module (part -> part)``."""
    bad = []
    for source, targets in edges.items():
        for target in targets:
            a, b = part_of(source), part_of(target)
            if a == ROOT or a == b:
                continue
            if b == ROOT or b not in ALLOWED[a]:
                bad.append(f"{source} -> {target} ({a} -> {b})")
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
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
                    work.append((child, iter(sorted(edges.get(child, ())))))
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


def test_every_part_of_the_package_is_in_the_map() -> None:
    parts = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert parts == set(ALLOWED) - {CORE}


def test_no_import_points_back_up() -> None:
    assert back_arrows(import_edges()) == []


def test_no_modules_import_each_other_in_a_circle() -> None:
    assert cycles(import_edges()) == []


@pytest.mark.parametrize(
    ("edges", "arrows", "circles"),
    [
        ({"slmstack.engine.engine": {"slmstack.stack.chains"}, "slmstack.stack.chains": set()},
         ["slmstack.engine.engine -> slmstack.stack.chains (engine -> stack)"], []),
        ({"slmstack.serving.app": {"slmstack.cli.serve"}},
         ["slmstack.serving.app -> slmstack.cli.serve (serving -> cli)"], []),
        ({"slmstack.io": {"slmstack"}}, ["slmstack.io -> slmstack (core -> slmstack)"], []),
        ({"slmstack.stack.a": {"slmstack.stack.b"}, "slmstack.stack.b": {"slmstack.stack.c"},
          "slmstack.stack.c": {"slmstack.stack.a"}, "slmstack.stack.d": {"slmstack.stack.a"}},
         [], [["slmstack.stack.a", "slmstack.stack.b", "slmstack.stack.c"]]),
        ({"slmstack.stack.runtime": {"slmstack.engine.engine", "slmstack.io"}}, [], []),
    ],
)  # fmt: skip
def test_the_checks_catch_a_back_arrow_and_a_cycle(edges, arrows, circles) -> None:
    assert back_arrows(edges) == arrows
    assert cycles(edges) == circles


def test_the_version_is_the_one_pyproject_declares() -> None:
    import re

    pyproject = SRC.parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("an installed copy: pyproject.toml is not beside the source")
    declared = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M)
    assert declared and slmstack.__version__ == declared.group(1)
