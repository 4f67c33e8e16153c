"""The package layout is the architecture: imports flow one way, down the layers.

The README draws the same layers. Every import counts, those inside functions included, so a
deferred import cannot hide a cycle or a dependency on a layer above.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: The installed product's packages, bottom layer first: a package may import the packages of
#: lower layers (and its own modules), never one of its own layer or above.
LAYERS: list[set[str]] = [
    {"app"},        # settings, the Faust App that agents attach to, the base error
    {"transport"},  # topics, message formats, the update protocol, bulk Kafka I/O
    {"models"},     # network, preprocessing, manifest, registry
    {"lake"},       # the archive writer and the reader the batch job uses
    {"serving", "batch"},
    {"speed"},
    {"stratum_cli"},  # the `stratum` command: talks to workers over HTTP, reads topics
]
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}
#: Development tooling and the demo: never imported by the product.
NOT_INSTALLED = {"devstack", "demo", "tests", "bench"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" \
        else module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def product_modules() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for package in RANK:
        for path in sorted((REPO / package).rglob("*.py")):
            graph[module_name(path)] = imports(path)
    return graph


GRAPH = product_modules()


def test_the_layers_cover_every_installed_package() -> None:
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    include = config["options.packages.find"]["include"].split()
    assert {name for name in include if not name.endswith(".*")} == set(RANK)
    assert not NOT_INSTALLED & set(include)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_a_module_imports_only_lower_layers(module: str) -> None:
    own = module.split(".")[0]
    upward = sorted(name for name in GRAPH[module]
                    if name.split(".")[0] in RANK and name.split(".")[0] != own
                    and RANK[name.split(".")[0]] >= RANK[own])
    assert not upward, f"{module} imports a layer at or above its own: {upward}"
    tooling = sorted(name for name in GRAPH[module] if name.split(".")[0] in NOT_INSTALLED)
    assert not tooling, f"{module} imports development tooling or the demo: {tooling}"


def test_no_import_cycle_between_modules() -> None:
    modules = set(GRAPH)
    edges: dict[str, set[str]] = defaultdict(set)
    for module, names in GRAPH.items():
        for name in names:
            # "from a.b import c" names a.b.c, which is a module or an attribute of a.b.
            target = name if name in modules else name.rsplit(".", 1)[0]
            if target in modules and target != module and not module.startswith(target + "."):
                edges[module].add(target)
    # Tarjan's strongly connected components: any with two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
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
                cycles.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
