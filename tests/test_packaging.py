"""Packaging: runtime dependencies are exactly what jaxswift/ imports, the test extra covers what tests import,
everything read at run time lives inside the package (so a wheel has it), and `--config NAME` finds a shipped config.

The wheel itself is built, installed in a fresh venv and run from outside the checkout by .ci/run.
"""

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

from jaxswift.errors import ConfigError
from jaxswift.recipes.common import CONFIGS_DIR, resolve_config, with_config_path

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "orbax": "orbax-checkpoint", "tensorboardX": "tensorboardx", "PIL": "pillow",
                "prometheus_client": "prometheus-client", "galore_torch": "galore-torch", "ml_dtypes": "ml-dtypes"}
# Declared without being imported, on purpose (each needs its reason).
NOT_IMPORTED: dict[str, str] = {}  # declared without an import of ours (none now: eval's task YAMLs import jinja2)
SERVE_ONLY = "jaxswift/serve"  # imported only by the server (and its recipe): the `serve` extra
SERVE_RECIPE = "jaxswift/recipes/serve.py"
GRAMMAR = "jaxswift/infer/grammar.py"  # structured output: reached only through the server's requests
WEBUI_ONLY = ("jaxswift/webui", "jaxswift/recipes/webui.py", "jaxswift/recipes/app.py")  # the `webui` extra


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _third_party_imports(paths) -> dict[str, set[str]]:
    """{distribution: {file, ...}} of every non-stdlib, non-jaxswift import at any depth."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                local = (REPO / "tests" / f"{top}.py").exists()  # a test helper module (conftest, fixtures)
                if top in sys.stdlib_module_names or top in ("jaxswift", "__future__") or local:
                    continue
                dist = DISTRIBUTION.get(top, top).lower().replace("_", "-")
                found.setdefault(dist, set()).add(str(path.relative_to(REPO)))
    return found


def _declared(group: str | None) -> set[str]:
    reqs = PYPROJECT["project"]["dependencies"] if group is None else \
        PYPROJECT["project"]["optional-dependencies"][group]
    return {_name(r) for r in reqs}


def test_runtime_dependencies_are_exactly_what_the_package_imports():
    imported = _third_party_imports(sorted((REPO / "jaxswift").rglob("*.py")))
    serve_only = {d for d, files in imported.items()
                  if all(f.startswith(SERVE_ONLY) or f in (SERVE_RECIPE, GRAMMAR) for f in files)}
    webui_only = {d for d, files in imported.items() if all(f.startswith(WEBUI_ONLY) for f in files)}
    core = set(imported) - serve_only - webui_only - {"datasets"}
    runtime = _declared(None)
    assert core - runtime == set(), f"imported by jaxswift/ but not declared: {core - runtime}"
    assert runtime - core == set(NOT_IMPORTED), f"declared but never imported: {runtime - core - set(NOT_IMPORTED)}"
    assert serve_only <= _declared("serve"), f"server imports missing from the serve extra: {serve_only - _declared('serve')}"
    assert _declared("serve") <= serve_only, f"serve extra lists what the server does not import"
    assert webui_only <= _declared("webui"), f"web UI imports missing from the webui extra: {webui_only - _declared('webui')}"
    assert _declared("datasets") == {"datasets"} and imported["datasets"] == {"jaxswift/data/formats.py"}


def test_the_test_extra_covers_what_tests_import():
    imported = _third_party_imports(sorted((REPO / "tests").rglob("*.py")))
    available = _declared(None) | _declared("test")
    assert set(imported) - available == set(), f"imported by tests but not in the test extra: " \
                                               f"{set(imported) - available}"
    assert "bitsandbytes" in imported and "bitsandbytes" in _declared("test")


def test_files_read_at_run_time_live_inside_the_package():
    """Everything the package reads beside its code matches a package-data pattern (so the wheel has it), and
    nothing outside jaxswift/ is looked up any more."""
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["jaxswift"]
    data = [p for p in (REPO / "jaxswift").rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert data, "the package ships data files"
    for path in data:
        rel = path.relative_to(REPO / "jaxswift")
        assert any(rel.match(pattern) for pattern in patterns), f"{rel} would be missing from a wheel"
    assert not (REPO / "sharding").exists() and not (REPO / "recipes").exists()
    from jaxswift.parallel.rules import RULES_DIR, load_rules

    assert RULES_DIR.is_relative_to(REPO / "jaxswift") and load_rules("fsdp").params


def test_config_by_name_or_path(tmp_path, monkeypatch):
    shipped = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
    assert "sft_lora_smollm2" in shipped and "serve_smollm2" in shipped
    assert resolve_config("sft_lora_smollm2") == str(CONFIGS_DIR / "sft_lora_smollm2.yaml")
    assert resolve_config("serve_smollm2.yaml") == str(CONFIGS_DIR / "serve_smollm2.yaml")
    own = tmp_path / "sft_lora_smollm2.yaml"  # a file of the same name wins over the shipped one
    own.write_text("lora_rank: 4\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_config("sft_lora_smollm2.yaml") == "sft_lora_smollm2.yaml"
    assert with_config_path(["--x", "1", "--config", "serve_smollm2"]) == \
        ["--x", "1", "--config", str(CONFIGS_DIR / "serve_smollm2.yaml")]
    assert with_config_path(["--config=serve_smollm2"]) == [f"--config={CONFIGS_DIR / 'serve_smollm2.yaml'}"]
    with pytest.raises(ConfigError, match=r"--config sft_lora_smolm2: no such file, and no config of that name "
                                          r"ships with jaxswift \(shipped: " + re.escape(", ".join(shipped)) + r"\)"):
        resolve_config("sft_lora_smolm2")
    with pytest.raises(ConfigError, match=r"--config elsewhere/serve_smollm2\.yaml: no such file"):
        resolve_config("elsewhere/serve_smollm2.yaml")  # a path that is not there is not a name


def test_a_recipe_resolves_a_config_name(capsys):
    """Through the real entry point: the name reaches the recipe as the shipped file's path (infer's flags are not
    SFT's, so it then names that file and the keys it does not know), and an unknown name is a one-line error."""
    from jaxswift.cli import main

    assert main(["infer", "--config", "sft_lora_smollm2"]) == 2
    assert f"{CONFIGS_DIR / 'sft_lora_smollm2.yaml'}: unknown keys" in capsys.readouterr().err
    assert main(["infer", "--config", "no_such_config"]) == 2
    assert "error: --config no_such_config: no such file" in capsys.readouterr().err
