"""Pure modules never import nvflare: only fedmed.flare and fedmed.deploy adapters may."""

import ast
from pathlib import Path

import fedmed

PACKAGE = Path(fedmed.__file__).parent
ADAPTER_PACKAGES = {"flare", "deploy"}
GLUE_MODULES = {"simulate.py", "runner.py"}  # run the simulator, the allow-list and the recipe checks, by design


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_pure_modules_do_not_import_nvflare():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ADAPTER_PACKAGES or relative.name in GLUE_MODULES:
            continue
        for name in _imports(path):
            if name == "nvflare" or name.startswith("nvflare.") or name.startswith("fedmed.flare") or name.startswith("fedmed.deploy"):
                offenders.append(f"{relative}: {name}")
    assert offenders == []


PURE_MODULES = ("aggregation.py", "rounds.py", "attacks.py", "provenance.py", "training.py", "data.py", "networks.py")


def test_the_named_pure_modules_exist_and_import_no_flare():
    for name in PURE_MODULES:
        path = PACKAGE / name
        assert path.is_file(), name
        flare = [m for m in _imports(path) if m.split(".")[0] == "nvflare" or m.startswith(("fedmed.flare", "fedmed.deploy"))]
        assert flare == [], (name, flare)
