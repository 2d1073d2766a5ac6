"""No import cycle anywhere in `src/lisa_peft`, and the tuner package depends on nothing above it.

The graph is built from the source with `ast`, without importing anything: one node per module
(`pkg/__init__.py` is the node `pkg`), one edge per import statement that names a lisa_peft module,
wherever it sits (module level, inside functions, under `TYPE_CHECKING`): a lazy import closes a
circle just as well at run time. `from pkg import name` is an edge to `pkg.name` when that is a
module, else to `pkg` itself. The implicit import of parent packages is not an edge (every
submodule would otherwise "depend" on the package `__init__` that re-exports it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "lisa_peft"


def module_names(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    names = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the lisa_peft modules it imports (see the module docstring for the rules)."""
    modules = module_names(src, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(name, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import lisa_peft.x.y as z` -> deepest known module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_checker_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from ..a import f\nfrom .. import c\n")
    (pkg / "c.py").write_text("import os\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub.b"] == {"pkg.a", "pkg.c"}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_no_import_cycle_in_lisa_peft():
    cycles = find_cycles(import_graph())
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


# (the modules under this prefix, may never reach modules under these prefixes, except these modules)
LAYER_RULES = [
    # the method knows nothing above it
    ("tuners", ["integrations", "compact", "pipeline", "evaluation", "commands", "cli"], []),
    # the compact model class never touches the Hub, the pipeline or evaluation (its card and push_to_hub
    # are installed from integrations.hub, its loading guard from integrations.loading)
    ("compact", ["integrations", "pipeline", "evaluation", "commands", "cli"], []),
    # the PEFT registration and the loading guards sit right above the tuner
    ("integrations.registration", ["integrations.hub", "compact", "pipeline", "evaluation", "commands"], []),
    ("integrations.loading", ["pipeline", "evaluation", "commands"], []),
    # transformers compatibility is a leaf of the tuner
    ("tuners.lisa.transformers_compat", ["tuners"], ["tuners.lisa.transformers_compat", "tuners.lisa.growing_cache"]),
    # measuring never trains or converts
    ("evaluation", ["pipeline.convert", "pipeline.calibration", "pipeline.training", "pipeline.recipe", "commands"],
     []),
]


# modules that other programs load by name (lm-eval's model registry): they import the whole package on purpose
ENTRY_POINTS = {f"{PACKAGE}.evaluation.lm_eval_model"}


@pytest.mark.parametrize(("layer", "forbidden", "allowed"), LAYER_RULES, ids=[rule[0] for rule in LAYER_RULES])
def test_each_layer_knows_nothing_above_it(layer, forbidden, allowed):
    graph = import_graph()
    modules = [name for name in graph if _under(name, f"{PACKAGE}.{layer}") and name not in ENTRY_POINTS]
    assert modules, f"no module under {PACKAGE}.{layer}"
    for name in modules:
        bad = sorted(
            m for m in reachable(graph, name)
            if m == PACKAGE or (any(_under(m, f"{PACKAGE}.{f}") for f in forbidden)
                                and not any(_under(m, f"{PACKAGE}.{a}") for a in allowed))
        )
        assert not bad, f"{name} reaches {bad}"


def test_no_loose_modules_at_the_top():
    """The package root holds entry points only; everything else lives in a sub-package of one layer."""
    top = sorted(name for name in import_graph() if name.count(".") == 1 and not name.endswith("__init__"))
    loose = [name for name in top if name.split(".")[1] not in
             {"tuners", "integrations", "compact", "pipeline", "evaluation", "commands", "cli", "extras", "version",
              "_moved"}]
    assert loose == []
