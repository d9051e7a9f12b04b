"""The layers of the ML core, read from the source (``ast``, nothing imported): specs and tasks at the
bottom, then the weighting methods and the model, which import nothing from the data sources, the run
plumbing or the tooling; and no import cycle among mtt_jax's modules."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mtt_jax"

DATA = ("mtt_jax.data",)
PLUMBING = ("mtt_jax.run", "mtt_jax.main")       # workdir, writers, checkpoints, ..., config checks
TOOLING = ("mtt_jax.perf", "mtt_jax.benchmark")  # FLOPs, profiling, huge pages
FORBIDDEN = DATA + PLUMBING + TOOLING
BOTTOM = ("mtt_jax.specs", "mtt_jax.tasks")  # what the weighting methods may import from outside


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, module_level_only: bool = False) -> set[str]:
    """The mtt_jax modules ``name`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if module_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & MODULES.keys()
            found |= submodules
            if len(submodules) < len(node.names):  # names defined in ``base`` itself
                found.add(base)
    return {module for module in found if module == "mtt_jax" or module.startswith("mtt_jax.")}


def within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


CORE = sorted(name for name in MODULES if within(name, ("mtt_jax.models", "mtt_jax.weighting"))) + [
    "mtt_jax.tasks", "mtt_jax.specs"]


@pytest.mark.parametrize("name", CORE)
def test_the_core_imports_no_data_plumbing_or_tooling(name):
    bad = sorted(module for module in imports(name) if within(module, FORBIDDEN))
    assert not bad, f"{name} imports {', '.join(bad)}"


@pytest.mark.parametrize("name", [n for n in CORE if within(n, ("mtt_jax.weighting",))])
def test_the_weighting_methods_import_only_their_package_and_the_bottom_layer(name):
    bad = sorted(module for module in imports(name)
                 if not within(module, ("mtt_jax.weighting",) + BOTTOM))
    assert not bad, f"{name} imports {', '.join(bad)}"


def test_the_bottom_layer_imports_nothing_from_mtt_jax():
    for name in BOTTOM:
        assert not imports(name), f"{name} imports {', '.join(sorted(imports(name)))}"


def test_no_import_cycle_among_mtt_jax_modules():
    def ancestors(module):
        parts = module.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))}

    graph = {}
    for name in MODULES:
        targets = imports(name, module_level_only=True)
        # Importing mtt_jax.a.b runs the package mtt_jax.a's __init__ first, unless that package holds
        # the importer (its __init__ is then already running, and only the submodule is looked up).
        targets |= set().union(*map(ancestors, targets)) - ancestors(name)
        graph[name] = {m for m in targets if m in MODULES and m != name}
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for child in sorted(graph[name]):
            if state.get(child) == "open":
                cycle = stack[stack.index(child):] + [child]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if child not in state:
                visit(child)
        stack.pop()
        state[name] = "done"

    for name in sorted(MODULES):
        if name not in state:
            visit(name)
