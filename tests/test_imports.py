"""The import graph: no cycles between packages, dependencies point down the layers, no package reads another's
`_private` names, and every module imports on its own. Read from the source with `ast`, so imports inside
functions count as much as those at the top of a file (a function-level import hides a cycle; it does not remove it).

The layers (docs/ARCHITECTURE.md draws them) are listed in LAYERS, lowest first: a package may import packages of
lower layers, and packages of its own layer only in the library floor (and never in a cycle).
"""

import ast
import collections
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "jaxswift"

LAYERS = [
    {"errors"},                                                             # exceptions every layer raises
    {"kernels"},                                                            # custom calls (C++ via XLA's FFI)
    {"models"},                                                             # config, specs, the forward
    {"losses", "tuners", "optim", "parallel", "data", "checkpoints", "quant"},  # the library floor
    {"infer"},                                                              # generation, the serving engine
    {"api", "jaxswift"},                                                    # the public facade (load_model, generate)
    {"train", "rl", "serve", "eval"},                                       # trainers, rollouts, server, evaluation
    {"webui"},                                                              # the browser UI (forms over the recipes)
    {"recipes"},                                                            # entry points
    {"cli"},                                                                # `jaxswift <command>`
]
SAME_LAYER_ALLOWED = {3}  # floor packages may use each other (e.g. quant reads folders through checkpoints)
# train stands beside rl, serve and eval and below the recipes that combine them (infer is below it: rollouts).
FORBIDDEN = {"train": {"rl", "serve", "eval"}}

LAYER_OF = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
TREES = {module: ast.parse(path.read_text(), str(path)) for module, path in MODULES.items()}


def imports_of(module: str) -> list[tuple[str, tuple[str, ...], int]]:
    """(imported jaxswift module, names taken from it, line) for every import statement, at any depth."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            found += [(alias.name, (), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from jaxswift.quant import awq` imports the module jaxswift.quant.awq
                sub = f"{target}.{alias.name}"
                found.append((sub, (), node.lineno) if sub in MODULES else (target, (alias.name,), node.lineno))
    return [(t, names, line) for t, names, line in found if t == "jaxswift" or t.startswith("jaxswift.")]


EDGES = {module: imports_of(module) for module in MODULES}


def package_graph() -> dict[str, dict[str, list[str]]]:
    """{package: {imported package: ['module:line -> module', ...]}} across package boundaries."""
    graph = collections.defaultdict(lambda: collections.defaultdict(list))
    for module, targets in EDGES.items():
        for target, _, line in targets:
            a, b = package_of(module), package_of(target)
            if a != b:
                graph[a][b].append(f"{module}:{line} -> {target}")
    return graph


def test_every_package_has_a_layer():
    unknown = {package_of(m) for m in MODULES} - set(LAYER_OF)
    assert not unknown, f"packages missing from LAYERS (add them here and to docs/ARCHITECTURE.md): {unknown}"


def test_no_cycles_between_packages():
    graph = package_graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                cycles.append(" -> ".join(cycle) + "\n    " + "\n    ".join(
                    graph[a][b][0] for a, b in zip(cycle, cycle[1:])))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for package in sorted(graph):
        if package not in state:
            visit(package, [package])
    assert not cycles, "import cycles between packages:\n" + "\n".join(cycles)


def test_dependencies_point_down_the_layers():
    wrong = []
    for a, targets in package_graph().items():
        for b, sites in targets.items():
            upward = LAYER_OF[b] > LAYER_OF[a]
            sideways = LAYER_OF[b] == LAYER_OF[a] and LAYER_OF[a] not in SAME_LAYER_ALLOWED
            if upward or sideways or b in FORBIDDEN.get(a, ()):
                wrong += [f"{site}  ({a} may not import {b})" for site in sites]
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(set(wrong)))


def test_no_package_reads_another_packages_private_names():
    wrong = []
    for module, targets in EDGES.items():
        aliases = {}
        for target, names, line in targets:
            if package_of(target) == package_of(module):
                continue
            wrong += [f"{module}:{line} imports {target}.{n}" for n in names if n.startswith("_")]
        # `import jaxswift.x.y as m` / `from jaxswift.x import y` then `m._name` / `y._name`
        tree = TREES[module]
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    full = alias.name if isinstance(node, ast.Import) else f"{node.module}.{alias.name}"
                    if full in MODULES and package_of(full) != package_of(module):
                        aliases[alias.asname or alias.name] = full
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                wrong.append(f"{module}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    assert not wrong, "private names read across packages:\n" + "\n".join(sorted(wrong))


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The walk must count what a cycle hides behind: imports inside functions, and relative imports."""
    api_targets = {t for t, _, _ in EDGES["jaxswift.api"]}
    assert "jaxswift.quant.load" in api_targets  # imported inside load_model, not at the top
    assert "jaxswift.checkpoints.gguf" in api_targets
    cli_targets = {t for t, _, _ in EDGES["jaxswift.cli"]}
    assert "jaxswift.recipes.common" in cli_targets


def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh set of jaxswift modules: an import-time cycle raises here."""
    script = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        f"for name in {sorted(MODULES)!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'jaxswift' or m.startswith('jaxswift.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=3))\n"
        "print('\\n'.join(failed) or 'ALL OK')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ALL OK"), out.stdout[-5000:]


@pytest.mark.parametrize("rule", ["cycle", "upward", "private"])
def test_the_checks_catch_a_planted_violation(monkeypatch, rule):
    """Each check fails on a graph with one planted violation (so a green run means something)."""
    planted = dict(EDGES)
    if rule == "cycle":
        planted["jaxswift.models.config"] = EDGES["jaxswift.models.config"] + [("jaxswift.quant.nf4", (), 1)]
        check = test_no_cycles_between_packages
    elif rule == "upward":
        planted["jaxswift.data.formats"] = EDGES["jaxswift.data.formats"] + [("jaxswift.infer.engine", (), 1)]
        check = test_dependencies_point_down_the_layers
    else:
        planted["jaxswift.serve.openai"] = EDGES["jaxswift.serve.openai"] + [("jaxswift.infer.engine", ("_x",), 1)]
        check = test_no_package_reads_another_packages_private_names
    monkeypatch.setattr(sys.modules[__name__], "EDGES", planted)
    with pytest.raises(AssertionError):
        check()
