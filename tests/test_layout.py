"""The package's shape: no import cycle between modules (counting the imports inside functions too:
a lazy import that papers over a cycle is still a cycle), and a declared layering of the packages: a module
imports only from its own layer or the layers below it (so the measurement code and the CLI are never
imported by the core, and the judge never by the sampler)."""

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


# Lowest first. A module's layer is the one whose longest prefix matches its name.
LAYERS = [
    # the base: configs, logs, process groups, checkpoints and run folders, paths, plots
    ["spatialcore.errors", "spatialcore.atomic", "spatialcore.config", "spatialcore.vocab", "spatialcore.paths",
     "spatialcore.logs", "spatialcore.phases", "spatialcore.plots", "spatialcore.gpu", "spatialcore.dist", "spatialcore.fsdp",
     "spatialcore.checkpoint", "spatialcore.run_folder", "spatialcore.tiny", "spatialcore.shapes"],
    ["spatialcore.kernels"],      # fused math with plain references
    ["spatialcore.data"],         # synthetic scenes, pair sets, the pixel oracle, prompt and image lists
    ["spatialcore.reward"],       # SpatialScore: model, preprocessing, pair evaluation
    ["spatialcore.rl"],           # Flux sampler, policy, reward functions
    ["spatialcore.eval"],         # the judge of generators, held-out samples, the eval report
    ["spatialcore.trainers"],     # the loop and the trainers
    ["spatialcore.demo", "spatialcore.export", "spatialcore.sample", "spatialcore.config_reference",
     "spatialcore.plan"],  # what the commands run
    ["spatialcore.profiling"],    # measurement
    ["spatialcore.cli"],          # the command line
]


def _layer(module: str) -> int | None:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for pre in prefixes:
            if (module == pre or module.startswith(pre + ".")) and (best is None or len(pre) > best[1]):
                best = (i, len(pre))
    return None if best is None else best[0]


def test_every_module_has_a_layer():
    unplaced = [m for m in _graph() if m != "spatialcore" and _layer(m) is None]
    assert not unplaced, f"modules outside every layer of LAYERS: {unplaced}"


def test_imports_follow_the_layers():
    graph = _graph()
    bad = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})" for m in sorted(graph) if m != "spatialcore"
           for d in sorted(graph[m]) if d != "spatialcore" and _layer(d) > _layer(m)]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_every_package_is_listed_for_installation():
    """A non-editable install ships only the packages pyproject.toml lists: every folder with an
    __init__.py must be there (a new subpackage left out would import here and fail when installed)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join([pkg, *init.parent.relative_to(folder).parts])
             for pkg, folder in PACKAGES.items() for init in folder.rglob("__init__.py")}
    assert found == listed, (sorted(found - listed), sorted(listed - found))
