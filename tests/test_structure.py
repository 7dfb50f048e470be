"""The package's shape (issue 17, item 6; STYLE.md "Layers"): no import cycles, and layers
that point one way: cli -> jobs (pipeline/scan, mitosis, cohort, train) -> engine ->
dense / models -> ops -> backends, with slide readers and io below the jobs. Every import
statement counts, also those inside functions: a lazy import is still a dependency."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"pyfastscan": ROOT / "pyfastscan", "pyfastscan.kernels": ROOT / "kernels"}


def _modules():
    mods = {}
    for pkg, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg] + parts)] = path
    return mods


MODULES = _modules()


def _imports(mod: str, path: Path):
    """The pyfastscan modules ``mod`` imports (a name imported from a package counts as
    its submodule when there is one, else as the package)."""
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                out.add(full if full in MODULES else target)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in MODULES and m != mod}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycles():
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH[v]):
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
                found.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_the_package():
    assert {"pyfastscan.cli", "pyfastscan.pipeline.engine", "pyfastscan.ops.anchor", "pyfastscan.kernels.anchor"} <= set(
        MODULES)
    assert "pyfastscan.pipeline.engine" in GRAPH["pyfastscan.pipeline.scan"]


def test_no_import_cycles():
    cycles = _cycles()
    assert not cycles, "import cycles: " + "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{a} -> {sorted(GRAPH[a] & set(c))}" for a in c) + ")" for c in cycles)


JOBS = ("pyfastscan.pipeline.scan", "pyfastscan.mitosis", "pyfastscan.cohort", "pyfastscan.train", "pyfastscan.demo",
        "pyfastscan.demo_train", "pyfastscan.benchmark")
ABOVE_OPS = ("pyfastscan.pipeline", "pyfastscan.mitosis", "pyfastscan.slide", "pyfastscan.models", "pyfastscan.dense",
             "pyfastscan.patch", "pyfastscan.io", "pyfastscan.eval", "pyfastscan.cli") + JOBS
RULES = [  # (modules under this prefix, may not import modules under these prefixes)
    ("pyfastscan.ops", ABOVE_OPS),
    ("pyfastscan.reference", ABOVE_OPS + ("pyfastscan.ops",)),
    ("pyfastscan.kernels", ABOVE_OPS + ("pyfastscan.nn",)),
    ("pyfastscan.backends", ABOVE_OPS),
    ("pyfastscan.slide", ("pyfastscan.pipeline", "pyfastscan.mitosis", "pyfastscan.models", "pyfastscan.dense",
                          "pyfastscan.eval", "pyfastscan.cli") + JOBS),
    ("pyfastscan.io", ("pyfastscan.pipeline", "pyfastscan.mitosis", "pyfastscan.slide", "pyfastscan.models",
                       "pyfastscan.dense", "pyfastscan.eval", "pyfastscan.cli") + JOBS),
    ("pyfastscan.pipeline.engine", ("pyfastscan.cli",) + JOBS),
    ("pyfastscan.pipeline.readers", ("pyfastscan.cli",) + JOBS),
    ("pyfastscan.dense", ("pyfastscan.pipeline", "pyfastscan.cli", "pyfastscan.slide", "pyfastscan.io") + JOBS),
    ("pyfastscan.models", ("pyfastscan.pipeline", "pyfastscan.cli", "pyfastscan.slide") + JOBS),
]


def _under(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


@pytest.mark.parametrize("layer,forbidden", RULES, ids=[r[0] for r in RULES])
def test_layers_point_one_way(layer, forbidden):
    bad = sorted((m, t) for m in GRAPH if _under(m, layer) for t in GRAPH[m]
                 if any(_under(t, f) for f in forbidden) and not _under(t, layer))
    assert not bad, f"{layer} imports from above it: " + ", ".join(f"{m} -> {t}" for m, t in bad)


def test_only_the_entry_points_import_the_command_line():
    users = sorted(m for m in GRAPH if "pyfastscan.cli" in GRAPH[m])
    assert users == ["pyfastscan.__main__"], users
