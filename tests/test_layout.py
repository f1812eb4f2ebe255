"""The library's structure, checked from its source (nothing is imported or run).

- Layers: a package imports only from its own layer's package or from lower layers
  (`LAYERS`, bottom first), so that the floors of docs/design.md hold as the code grows.
- No import cycle between modules, counting every `cbtlab` import wherever it stands.
- Imports of `cbtlab` modules inside functions are the listed ones, each for a stated reason.
- No function is longer than 80 lines.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "platform" / "cbtlab"

# Bottom first. A module belongs to the first entry that is its package or its own name.
LAYERS: list[set[str]] = [
    {"attention", "overrides", "paths", "tables"},
    {"models"},
    {"config"},
    {"checkpoint", "cluster", "tracking"},
    {"data"},
    {"analysis"},
    {"train"},
    {"tune", "perf"},
    {"dashboards", "cli"},
]

# (module, imported module): why the import waits until the function runs.
LAZY_IMPORTS: dict[tuple[str, str], str] = {
    # `import cbtlab` registers the zoo with timm once timm is imported, never torch before.
    ("cbtlab", "cbtlab.models.zoo"): "import cbtlab loads no torch",
    ("cbtlab.attention.cbsa", "cbtlab.attention.cbsa_triton"): "triton is optional",
    # `cbtlab --help` and `cbtlab where` must answer at once: config, data and train load torch.
    ("cbtlab.cli", "cbtlab.config"): "start-up of the cbtlab command",
    ("cbtlab.cli", "cbtlab.data"): "start-up of the cbtlab command",
    # `cbtlab train`'s flag errors come before Ray's and MLflow's imports (and MLflow is
    # optional on a bare GPU machine).
    ("cbtlab.train.cli", "cbtlab.train.mlflow_run"): "after the flags; MLflow optional",
    # `cbtlab.train` imports on a bare GPU machine without Ray; the callback subclasses Ray's.
    ("cbtlab.train.trainer", "cbtlab.train.retries"): "Ray is optional there",
    # The benchmarks run on bare GPU machines without MLflow; cbtlab.tracking imports it.
    ("cbtlab.perf.record", "cbtlab.tracking.mlflow_tracker"): "MLflow is optional there",
    ("cbtlab.perf.record", "cbtlab.tracking.provenance"): "MLflow is optional there",
}

MAX_FUNCTION_LINES = 80


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, ast.parse(path.read_text(), filename=str(path))


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _layer(module: str) -> int:
    package = _package(module)
    for i, members in enumerate(LAYERS):
        if package in members:
            return i
    raise AssertionError(f"{module}: package {package!r} is on no layer of LAYERS")


def _imports(module: str, tree: ast.Module) -> Iterator[tuple[str, ast.stmt, bool]]:
    """(imported cbtlab module, statement, inside a function) for every cbtlab import."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    is_package = (ROOT.parent / module.replace(".", "/") / "__init__.py").exists()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "cbtlab"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "cbtlab":
                continue
            # `from cbtlab.pkg import module` names a module: count it as that module.
            names = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                exists = (ROOT.parent / (sub.replace(".", "/") + ".py")).exists()
                names.append(sub if exists else target)
        else:
            continue
        for name in names:
            if name != "cbtlab":
                yield name, node, id(node) in inside


def test_every_import_goes_down_the_layers() -> None:
    upward: set[str] = set()
    for module, tree in _modules():
        if module == "cbtlab":
            continue
        for target, node, _ in _imports(module, tree):
            if _layer(target) > _layer(module) or (
                _layer(target) == _layer(module) and _package(target) != _package(module)
            ):
                upward.add(f"{module}:{node.lineno} imports {target}")
    assert not upward, "imports that run up (or sideways across) the layers:\n" + "\n".join(
        sorted(upward)
    )


def test_no_import_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for module, tree in _modules():
        graph[module] = {t for t, _, _ in _imports(module, tree) if t != module}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[node] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_inside_functions_are_the_listed_ones() -> None:
    lazy = {
        (module, target): node.lineno
        for module, tree in _modules()
        for target, node, inside in _imports(module, tree)
        if inside
    }
    unlisted = sorted(
        f"{m}:{line} imports {t}" for (m, t), line in lazy.items() if (m, t) not in LAZY_IMPORTS
    )
    assert not unlisted, "cbtlab imports inside functions, not in LAZY_IMPORTS:\n" + "\n".join(
        unlisted
    )
    stale = sorted(f"{m} -> {t}" for m, t in LAZY_IMPORTS if (m, t) not in lazy)
    assert not stale, "LAZY_IMPORTS lists imports that are gone:\n" + "\n".join(stale)


def test_no_function_is_longer_than_80_lines() -> None:
    long = [
        f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for module, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def test_the_checker_sees_a_known_import() -> None:
    """The checks above are only as good as the import reader: it must see real edges."""
    graph = {module: {t for t, _, _ in _imports(module, tree)} for module, tree in _modules()}
    assert "cbtlab.attention" in graph["cbtlab.models.blocks"]
    assert ("cbtlab.attention.cbsa", "cbtlab.attention.cbsa_triton") in {
        (m, t) for m, targets in graph.items() for t in targets
    }
