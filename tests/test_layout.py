"""The package's layering, read from its imports with `ast` (no module is executed).

Library code sits below, commands on top (DESIGN, principle 1):
- nothing in models/, diffusion/, encoders/, data/, eval/ or training/ imports the commands (`micro_diffusion.cli`);
- `micro_diffusion.training` is imported only by train.py, the commands and the pipeline runner;
- the plain-PyTorch core (models/ but model.py, diffusion/, encoders/, data/sources, eval/) imports no Composer;
- no two files of the package import each other, directly or through others.
Every import counts, also those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "micro_diffusion"
LIBRARY = ("models", "diffusion", "encoders", "data", "eval", "training")
# Who may import micro_diffusion.training: the training script, the commands and the pipeline runner.
TRAINING_IMPORTERS = ("train", "micro_diffusion.training", "micro_diffusion.cli", "micro_diffusion.pipeline",
                      "scripts.train_pipeline")
COMPOSER_FREE = ("models", "diffusion", "encoders", "data.sources", "eval")
COMPOSER_ALLOWED = ("micro_diffusion.models.model",)


def module_name(path: Path) -> str:
    """tests/../micro_diffusion/data/convert.py -> "micro_diffusion.data.convert" (a package: its __init__)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    """Every module of the package, plus train.py and scripts/*.py, by dotted name."""
    paths = [*(ROOT / PACKAGE).rglob("*.py"), ROOT / "train.py", *(ROOT / "scripts").glob("*.py")]
    return {module_name(path): path for path in paths}


def imported_names(path: Path, module: str) -> Iterator[tuple[str, int]]:
    """(absolute dotted name, line) of everything a file imports, relative imports resolved. `from a.b import c`
    yields "a.b.c" (c may be a module or a name in a.b; `in_scope` handles both)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield (f"{base}.{alias.name}" if alias.name != "*" else base), node.lineno


def in_scope(name: str, prefix: str) -> bool:
    """True when the dotted `name` is `prefix` or lies below it."""
    return name == prefix or name.startswith(prefix + ".")


def import_edges() -> list[tuple[str, str, int]]:
    """(importer, imported module of the package, line) for every import in `source_files()`; an imported name
    that is not a module is resolved to the module that holds it. A module importing a package it lies in is no
    edge: Python has run that package's __init__ before the module itself (e.g. `data.sources.base` importing
    `data.sources` to make sure the built-in readers are registered)."""
    files = source_files()
    edges = []
    for module, path in files.items():
        for name, line in imported_names(path, module):
            target = name
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and not in_scope(module, target) and (module, target, line) not in edges:
                edges.append((module, target, line))
    return edges


def external_imports(prefixes: tuple[str, ...]) -> list[tuple[str, str, int]]:
    """(importer, imported name, line) of every import made by the modules under `prefixes` of the package."""
    found = []
    for module, path in source_files().items():
        if any(in_scope(module, f"{PACKAGE}.{prefix}") for prefix in prefixes):
            found += [(module, name, line) for name, line in imported_names(path, module)]
    return found


def describe(edges: list[tuple[str, str, int]]) -> str:
    return "\n".join(f"  {importer} (line {line}) imports {imported}" for importer, imported, line in edges)


def test_import_walker_sees_every_kind_of_import(tmp_path: Path) -> None:
    """Relative imports resolve, imports inside functions count, `from package import module` names the module."""
    path = ROOT / PACKAGE / "data" / "example.py"  # not written: only its name places the relative imports
    source = "from . import schema\nfrom ..models import dit\ndef f():\n    import composer.core\n"
    tmp = tmp_path / "example.py"
    tmp.write_text(source)
    names = [name for name, _ in imported_names(tmp, module_name(path))]
    assert names == ["micro_diffusion.data.schema", "micro_diffusion.models.dit", "composer.core"]


def test_library_does_not_import_the_commands() -> None:
    bad = [
        edge for edge in import_edges()
        if any(in_scope(edge[0], f"{PACKAGE}.{layer}") for layer in LIBRARY) and in_scope(edge[1], f"{PACKAGE}.cli")
    ]
    assert not bad, f"library modules import the commands (micro_diffusion.cli):\n{describe(bad)}"


def test_training_is_imported_only_by_the_launchers() -> None:
    bad = [
        edge for edge in import_edges()
        if in_scope(edge[1], f"{PACKAGE}.training") and not any(in_scope(edge[0], ok) for ok in TRAINING_IMPORTERS)
    ]
    assert not bad, (
        f"micro_diffusion.training may be imported only by {', '.join(TRAINING_IMPORTERS)}:\n{describe(bad)}"
    )


def test_core_imports_no_composer() -> None:
    bad = [
        edge for edge in external_imports(COMPOSER_FREE)
        if in_scope(edge[1], "composer") and edge[0] not in COMPOSER_ALLOWED
    ]
    assert not bad, f"the plain-PyTorch core imports Composer (DESIGN, principle 1):\n{describe(bad)}"


def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components of the directed graph, each a list of its nodes."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
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
                    work.append((child, iter(sorted(graph[child]))))
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
                components.append(sorted(component))
    return components


def cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One cycle through the first module of a strongly-connected component: [a, b, ..., a]."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for child in sorted(graph[node] & members):
            if child == start:
                return paths[node] + [start]
            if child not in paths:
                paths[child] = paths[node] + [child]
                frontier.append(child)
    raise AssertionError(f"no cycle through {start}")


def test_strongly_connected_components_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    components = strongly_connected_components(graph)
    assert sorted(map(sorted, components)) == [["a", "b", "c"], ["d"], ["e"]]
    assert cycle_in(["a", "b", "c"], graph) == ["a", "b", "c", "a"]


def test_no_import_cycles() -> None:
    """The module graph of the package (an edge per import, also imports inside functions) is acyclic."""
    graph: dict[str, set[str]] = {module: set() for module in source_files() if in_scope(module, PACKAGE)}
    for importer, imported, _ in import_edges():
        if importer in graph and imported in graph:
            graph[importer].add(imported)
    cycles = [cycle_in(c, graph) for c in strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("path", ["generate", "evaluate", "posthoc_ema", "autoencoder_stats", "demo", "cli"])
def test_commands_live_in_cli(path: str) -> None:
    """The root modules that mixed argparse and library code are gone (no re-exports left behind)."""
    assert not (ROOT / PACKAGE / f"{path}.py").exists()
