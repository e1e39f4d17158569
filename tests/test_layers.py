"""The layer order, checked by parsing every module's imports: no back-edge, no cycle, no long module.

Layers, lowest first: colorspaces < models < ensemble < skinfusion < experiments, and inside the
application skinfusion.data < skinfusion.workflows < skinfusion.serve < skinfusion.bench < skinfusion.cli. ``skinfusion/__init__.py``
(the public facade) and ``skinfusion/__main__.py`` (the entry point) sit on top of the application
and may import anything below them. Every import counts, including those inside functions and
under ``if TYPE_CHECKING``: an import moved into a function to dodge a circle is still a circle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("colorspaces", "models", "ensemble", "skinfusion", "experiments")
PRODUCT = PACKAGES[:-1]
# Inside skinfusion, lowest first; the facade and the entry point rank above every sub-layer.
APPLICATION = ("data", "workflows", "serve", "bench", "cli")
TOP_OF_APPLICATION = ("skinfusion", "skinfusion.__main__")
MAX_LINES = 450


# ---------------------------------------------------------------- the checker
def discover_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """``{dotted module name: file}`` for every .py file under the given top-level packages of ``root``."""
    modules = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is one of our modules (``a.b.func`` -> ``a.b``)."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in modules:
            return candidate
    return None


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """Every project module ``module`` imports, anywhere in the file, as ``(target, line)``.

    ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``.
    Relative imports are resolved against the module's package. Literal
    ``importlib.import_module("x.y")`` calls count too.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if _is_package(module, modules) else module.rpartition(".")[0]
    edges = []

    def add(name: str, line: int) -> None:
        target = _resolve(name, modules)
        if target == module:
            return  # a package's __init__ naming itself: not an edge
        if target is not None:
            edges.append((target, line))
        elif name.split(".")[0] in ("tests", "conftest", "helpers"):
            edges.append((name, line))  # the product never imports the tests; flagged as a foreign target

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                full = f"{origin}.{alias.name}"
                add(full if full in modules else origin, node.lineno)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__"):
                add(node.args[0].value, node.lineno)
    return edges


def import_graph(root: Path, packages=PACKAGES) -> dict[str, dict[str, int]]:
    """``{module: {imported module: first line}}`` over every module under ``packages``."""
    modules = discover_modules(root, packages)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        targets: dict[str, int] = {}
        for target, line in imported_modules(name, path, modules):
            targets.setdefault(target, line)
        graph[name] = targets
    return graph


def layer_of(module: str) -> tuple[int, int] | None:
    """Sort key of a module's layer; ``None`` for modules outside the layered packages."""
    top = module.split(".")[0]
    if top not in PACKAGES:
        return None
    rank = PACKAGES.index(top)
    if top != "skinfusion":
        return (rank, 0)
    if module in TOP_OF_APPLICATION:
        return (rank, len(APPLICATION))
    sub = module.split(".")[1]
    if sub not in APPLICATION:
        return (rank, -1)  # an unplanned sub-package: flagged by test_every_application_module_has_a_sub_layer
    return (rank, APPLICATION.index(sub))


def layer_name(module: str) -> str:
    parts = module.split(".")
    return module if module in TOP_OF_APPLICATION else ".".join(parts[:2] if parts[0] == "skinfusion" else parts[:1])


def back_edges(graph: dict[str, dict[str, int]], root: Path) -> list[str]:
    """One line per import that points up the layer order (or at the tests), naming file and line."""
    files = discover_modules(root)
    problems = []
    for module, targets in sorted(graph.items()):
        here = layer_of(module)
        for target, line in sorted(targets.items()):
            there = layer_of(target)
            where = f"{files[module].relative_to(root)}:{line}"
            if there is None:
                problems.append(f"{where}: {module} imports {target}, which is not a product module")
            elif there > here:
                problems.append(f"{where}: {module} ({layer_name(module)}) imports {target} ({layer_name(target)}), "
                                "a higher layer")
    return problems


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One concrete cycle ``[a, b, ..., a]`` per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # Tarjan; the graphs are small enough for recursion
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in graph:
                continue
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            components.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for comp in components:
        members = set(comp)
        start = min(comp)
        if len(comp) == 1 and start not in graph[start]:
            continue
        # Breadth-first from start back to start inside the component: a shortest concrete cycle.
        parent: dict[str, str] = {}
        frontier, seen, closing = [start], {start}, None
        while frontier and closing is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        closing = v
                        break
                    if w in members and w not in seen:
                        seen.add(w)
                        parent[w] = v
                        nxt.append(w)
                if closing is not None:
                    break
            frontier = nxt
        path = [closing]
        while path[-1] != start:
            path.append(parent[path[-1]])
        cycles.append([start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start])
    return cycles


def experiments_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    return [f"{m} imports {t}" for m, ts in sorted(graph.items()) if m.split(".")[0] in PRODUCT
            for t in sorted(ts) if t.split(".")[0] == "experiments"]


def long_modules(root: Path, limit: int = MAX_LINES) -> list[str]:
    out = []
    for name, path in discover_modules(root).items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > limit:
            out.append(f"{path.relative_to(root)}: {n} lines")
    return out


# ---------------------------------------------------------------- the checks on this repository
@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT)


def test_the_packages_hold_modules_and_imports_were_found(graph):
    """Guards the checks below against passing on an empty graph (a moved root, a broken parser)."""
    assert {m.split(".")[0] for m in graph} == set(PACKAGES)
    assert sum(len(t) for t in graph.values()) > 50
    # every layer above the first builds on the one below it, so its imports into lower layers were seen
    for pkg in PACKAGES[1:]:
        assert any(layer_of(t)[0] < PACKAGES.index(pkg) for m, ts in graph.items() if m.split(".")[0] == pkg
                   for t in ts), f"no import from {pkg} into a lower layer was found"


def test_no_import_points_up_the_layer_order(graph):
    problems = back_edges(graph, ROOT)
    assert not problems, "imports against the layer order " + " < ".join(PACKAGES) + \
        " (inside skinfusion: " + " < ".join(APPLICATION) + "):\n" + "\n".join(problems)


def test_there_are_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (move the shared piece down a layer):\n" + \
        "\n".join(" -> ".join(c) for c in cycles)


def test_no_product_module_imports_experiments(graph):
    found = experiments_imports(graph)
    assert not found, "the product must not import the research scripts:\n" + "\n".join(found)


def test_every_application_module_has_a_sub_layer(graph):
    stray = [m for m in graph if m.startswith("skinfusion") and layer_of(m)[1] == -1]
    assert not stray, f"skinfusion modules outside {APPLICATION} and the facade: {stray}"


def test_no_module_is_longer_than_the_limit():
    offenders = long_modules(ROOT)
    assert not offenders, f"modules over {MAX_LINES} lines (split them by concern):\n" + "\n".join(offenders)


# ---------------------------------------------------------------- the layer diagram in docs/architecture.md
_TREE_LINE = re.compile(r"^(?P<indent> *)(?P<name>[A-Za-z_][\w]*)/(?:\s|$)")


def readme_layer_diagram(readme: Path) -> list[tuple[int, str]]:
    """``[(indent, package)]`` from the first fenced block under ``## How it works``."""
    text = readme.read_text(encoding="utf-8")
    section = re.search(r"^## How it works[ \t]*\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, f"{readme.name} has no '## How it works' section"
    body = section.group(1)
    block = re.match(r"\s*```[^\n]*\n(.*?)^```", body, re.S | re.M)
    assert block, "'## How it works' must open with a fenced code block holding the layer diagram"
    entries = []
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        m = _TREE_LINE.match(line)
        assert m, f"layer diagram line is not '<package>/  <description>': {line!r}"
        entries.append((len(m.group("indent")), m.group("name")))
    return entries


def diagram_order(entries: list[tuple[int, str]]) -> tuple[list[str], list[str]]:
    """The top-level packages in order, and skinfusion's indented sub-packages in order."""
    top = [name for indent, name in entries if indent == 0]
    subs, parent = [], None
    for indent, name in entries:
        if indent == 0:
            parent = name
        elif parent == "skinfusion":
            subs.append(name)
        else:
            raise AssertionError(f"indented line {name}/ under {parent}/: only skinfusion/ has sub-layers")
    return top, subs


def test_readme_how_it_works_opens_with_the_enforced_layer_diagram():
    top, subs = diagram_order(readme_layer_diagram(ROOT / "docs" / "architecture.md"))
    assert top == [*PACKAGES, "tests"], f"diagram packages {top} differ from the enforced order {[*PACKAGES, 'tests']}"
    assert subs == list(APPLICATION), f"diagram's skinfusion/ sub-layers {subs} differ from {list(APPLICATION)}"
    for pkg in PACKAGES:
        assert (ROOT / pkg / "__init__.py").is_file(), f"the diagram names {pkg}/, which is not a package"
    for sub in APPLICATION:
        assert (ROOT / "skinfusion" / sub / "__init__.py").is_file(), f"skinfusion/{sub}/ is not a package"


# ---------------------------------------------------------------- the checker can fail
def _write(root: Path, rel: str, text: str = "") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def clean_tree(tmp_path):
    """A small tree with every layer, and only downward imports (including relative and lazy ones)."""
    for pkg in PACKAGES:
        _write(tmp_path, f"{pkg}/__init__.py")
    for sub in APPLICATION:
        _write(tmp_path, f"skinfusion/{sub}/__init__.py")
    _write(tmp_path, "colorspaces/views.py", "import numpy as np\n")
    _write(tmp_path, "colorspaces/__init__.py", "from .views import np\n")
    _write(tmp_path, "models/branch.py", "from colorspaces import views\nimport colorspaces.views\n")
    _write(tmp_path, "ensemble/api.py", "def f():\n    from models.branch import x\n")
    _write(tmp_path, "skinfusion/data/index.py", "from ensemble import api\n")
    _write(tmp_path, "skinfusion/workflows/train.py", "from ..data import index\n")
    _write(tmp_path, "skinfusion/cli/main.py", "from skinfusion.workflows.train import run\n")
    _write(tmp_path, "skinfusion/__init__.py", "import importlib\nimportlib.import_module('skinfusion.cli.main')\n")
    _write(tmp_path, "experiments/study.py", "import skinfusion\nfrom skinfusion.cli.main import main\n")
    return tmp_path


def test_checker_passes_a_clean_tree_and_resolves_every_import_form(clean_tree):
    graph = import_graph(clean_tree)
    assert back_edges(graph, clean_tree) == [] and find_cycles(graph) == [] and experiments_imports(graph) == []
    assert set(graph["models.branch"]) == {"colorspaces.views"}  # `from pkg import module` -> pkg.module
    assert set(graph["colorspaces"]) == {"colorspaces.views"}  # relative, from a package's __init__
    assert set(graph["skinfusion.workflows.train"]) == {"skinfusion.data.index"}  # relative, two dots
    assert set(graph["ensemble.api"]) == {"models.branch"}  # inside a function
    assert set(graph["skinfusion"]) == {"skinfusion.cli.main"}  # importlib with a literal name


def test_checker_flags_a_planted_back_edge_inside_a_function(clean_tree):
    _write(clean_tree, "models/branch.py", "from colorspaces import views\ndef f():\n    import ensemble.api\n")
    _write(clean_tree, "skinfusion/data/index.py", "def g():\n    from skinfusion.cli import main\n")
    problems = back_edges(import_graph(clean_tree), clean_tree)
    assert len(problems) == 2
    assert "models/branch.py:3: models.branch (models) imports ensemble.api (ensemble)" in problems[0]
    assert "skinfusion.data.index (skinfusion.data) imports skinfusion.cli.main (skinfusion.cli)" in problems[1]


def test_checker_flags_a_planted_cycle_and_names_it(clean_tree):
    _write(clean_tree, "ensemble/fusion.py", "from ensemble.bundle import x\n")
    _write(clean_tree, "ensemble/bundle.py", "from ensemble.engine import y\n")
    _write(clean_tree, "ensemble/engine.py", "def lazy():\n    from . import fusion\n")
    cycles = find_cycles(import_graph(clean_tree))
    assert cycles == [["ensemble.bundle", "ensemble.engine", "ensemble.fusion", "ensemble.bundle"]]


def test_checker_flags_product_importing_experiments_and_tests(clean_tree):
    _write(clean_tree, "skinfusion/cli/bench.py", "from experiments import study\n")
    _write(clean_tree, "models/train.py", "import helpers\n")
    graph = import_graph(clean_tree)
    assert experiments_imports(graph) == ["skinfusion.cli.bench imports experiments.study"]
    problems = back_edges(graph, clean_tree)
    assert any("skinfusion.cli.bench (skinfusion.cli) imports experiments.study (experiments)" in p for p in problems)
    assert any("models.train imports helpers, which is not a product module" in p for p in problems)


def test_long_module_check_names_the_offender(clean_tree):
    _write(clean_tree, "models/big.py", "x = 1\n" * (MAX_LINES + 1))
    assert long_modules(clean_tree) == [f"models/big.py: {MAX_LINES + 1} lines"]


def test_readme_check_refuses_a_diagram_out_of_order(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## How it works\n\n```\ncolorspaces/  a\nensemble/  b\nmodels/  c\nskinfusion/  d\n"
                      "  data/\n  cli/\n  workflows/\nexperiments/\ntests/\n```\n\n## Next\n")
    top, subs = diagram_order(readme_layer_diagram(readme))
    assert top[:3] == ["colorspaces", "ensemble", "models"] and subs == ["data", "cli", "workflows"]
    assert top != [*PACKAGES, "tests"] and subs != list(APPLICATION)
    readme.write_text("## How it works\n\nProse first.\n\n```\ncolorspaces/\n```\n")
    with pytest.raises(AssertionError, match="must open with a fenced code block"):
        readme_layer_diagram(readme)
