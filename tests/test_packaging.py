"""What the installed code imports is declared in pyproject.toml, not present by luck."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("fedmud", "fedmud_wire", "server", "client", "bench")  # the packages pyproject installs


def _top_level_imports(package: str) -> set[str]:
    names = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _imported_top_level_modules() -> set[str]:
    names = set().union(*(_top_level_imports(package) for package in SHIPPED))
    return names - set(sys.stdlib_module_names) - set(SHIPPED)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_of_the_shipped_packages_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # an extra other than dev declares an optional import too (fedmud/hf.py imports transformers
    # when a model is "hf:...", and says to install fedmud[hf] when it is missing)
    optional = [dep for extra, deps in project["optional-dependencies"].items() if extra != "dev" for dep in deps]
    declared = {_normalise(re.split(r"[\[<>=!~; ]", dep, maxsplit=1)[0]) for dep in [*project["dependencies"], *optional]}
    distributions = packages_distributions()
    undeclared = {}
    for module in sorted(_imported_top_level_modules()):
        providers = {_normalise(d) for d in distributions.get(module, [module])}
        if not providers & declared:
            undeclared[module] = sorted(providers)
    assert not undeclared, f"imported but not declared in [project].dependencies or an extra: {undeclared}"


def test_the_library_never_imports_flower_and_the_two_apps_do_not_import_each_other():
    assert "flwr" not in _top_level_imports("fedmud")
    assert "server" not in _top_level_imports("client") and "client" not in _top_level_imports("server")
    assert "fedmud_wire" in _top_level_imports("client") and "fedmud_wire" in _top_level_imports("server")
