"""The package's shape: no import cycle between modules (counting the imports inside functions too:
a lazy import that papers over a cycle is still a cycle), and the core never imports the
measurement code."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# installed name -> folder in the checkout (pyproject.toml's package-dir)
PACKAGES = {"spatialcore": ROOT / "spatialcore", "spatialcore.kernels": ROOT / "kernels",
            "spatialcore.trainers": ROOT / "trainers", "spatialcore.profiling": ROOT / "profiling"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if "benchmarks" in parts:  # pytest-benchmark files, not part of the package
                continue
            mods[".".join([pkg, *parts])] = f
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - node.level + 1]
                mod = ".".join(stem + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            # a package's __init__ importing its own submodules is the usual re-export, not a cycle
            if d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_core_does_not_import_profiling():
    graph = _graph()
    core = [m for m in graph if not m.startswith("spatialcore.profiling") and m != "spatialcore.cli"]  # the CLI runs it
    bad = {m: sorted(d for d in graph[m] if d.startswith("spatialcore.profiling")) for m in core}
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"core modules import spatialcore.profiling: {bad}"


def test_every_package_is_listed_for_installation():
    """A non-editable install ships only the packages pyproject.toml lists: every folder with an
    __init__.py must be there (a new subpackage left out would import here and fail when installed)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join([pkg, *init.parent.relative_to(folder).parts])
             for pkg, folder in PACKAGES.items() for init in folder.rglob("__init__.py")}
    assert found == listed, (sorted(found - listed), sorted(listed - found))
