"""The package's shape: no import circles, and dependencies point one way between the wings.

Reads the source with `ast` (no import is executed), so it also sees imports inside functions.
Run `python tests/test_layout.py` to print the module graph and any circle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "codelupe_trainer"

# What each wing may import from the package. Top-level modules are named by their own name.
# cli -> service -> cycle -> {data, training, state, metrics, ...} -> config; demo is an entry point like cli.
ALLOWED = {
    "data": {"config", "errors", "faults", "data"},
    "training": {"config", "errors", "faults", "logs", "data", "training"},  # logs: a rank process sets up its own
    "service": {"config", "cycle", "data", "errors", "failures", "faults", "hooks", "lock", "logs", "metrics", "outcome", "progress",
                "stop", "state", "training", "service"},
}


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Package modules that `path` imports, resolved to module names (a `from .x import name` of a module
    counts as importing that module)."""
    name = module_name(path)
    package_parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {module for module in found if module in known and module != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, known) for path in paths}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan's algorithm), each a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for neighbour in graph.get(node, ()):
            if neighbour not in index:
                visit(neighbour)
                low[node] = min(low[node], low[neighbour])
            elif neighbour in on_stack:
                low[node] = min(low[node], index[neighbour])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def wing_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_find_cycles_sees_a_circle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 20  # the walk found the package
    assert find_cycles(graph) == []


def test_wings_import_only_downward():
    wrong = []
    for module, imports in import_graph().items():
        wing = wing_of(module)
        if wing not in ALLOWED:
            continue
        for target in imports:
            if wing_of(target) not in ALLOWED[wing]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_only_the_edges_import_the_heavy_libraries():
    """psycopg only in the source (and the demo, which fills its own table), wandb only in metrics,
    apscheduler only in the scheduler."""
    owners = {"psycopg": {"codelupe_trainer.data.source", "codelupe_trainer.demo.demo", "codelupe_trainer.demo.pgserver"}, "wandb": {"codelupe_trainer.metrics"},
              "apscheduler": {"codelupe_trainer.service.scheduler"}}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        roots = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                roots.add(node.module.split(".")[0])
        for library, allowed in owners.items():
            if library in roots:
                assert module_name(path) in allowed, f"{module_name(path)} imports {library}"


if __name__ == "__main__":
    graph = import_graph()
    for module in sorted(graph):
        print(f"{module} -> {', '.join(sorted(graph[module])) or '-'}")
    cycles = find_cycles(graph)
    print("import circles:", cycles or "none")
    sys.exit(1 if cycles else 0)


def test_the_readme_module_table_names_every_module():
    """The README's map of the code is how the next engineer finds a module: a new one must be on it."""
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    first_cells = " ".join(line.split("|")[1] for line in readme.splitlines() if line.startswith("| `"))
    modules = [path.relative_to(PACKAGE).as_posix() for path in sorted(PACKAGE.rglob("*.py")) if path.name != "__init__.py"]
    assert len(modules) > 20
    assert [module for module in modules if f"`{module}`" not in first_cells] == []


def test_every_test_the_readme_cites_as_proof_exists():
    """The README backs its promises with test names; a renamed or deleted test must not leave a claim
    pointing at nothing. `file::name` must be in that file, a bare `::name` in some test file."""
    import re

    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    tests = PACKAGE.parent / "tests"
    cited = re.findall(r"(tests/\w+\.py)?::(test_\w+)", readme)
    assert len(cited) > 20
    every_test = "\n".join(path.read_text(encoding="utf-8") for path in tests.glob("test_*.py"))
    missing = [f"{path}::{name}" for path, name in cited
               if not re.search(rf"def {name}\(", (PACKAGE.parent / path).read_text(encoding="utf-8") if path else every_test)]
    assert missing == []
