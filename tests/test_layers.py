"""The package's layers only look down: the numeric core never imports the workflows, the CLI or the
benchmarks; the workflows never import the CLI; nothing but the lazy front door and the CLI imports by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "pretrace"
CORE = ["curvature", "scores", "gradients", "methods", "baselines", "modeling", "data", "retrieval", "report", "training", "parallel",
        "storage.py", "stages.py", "config.py", "errors.py", "metrics.py"]
ABOVE = {"core": ("pretrace.workflows", "pretrace.cli", "pretrace.bench"), "workflows": ("pretrace.cli", "pretrace.bench")}
DYNAMIC_IMPORTS_ALLOWED = {ROOT / "__init__.py", ROOT / "cli" / "__init__.py"}


def _files(part: str) -> list[Path]:
    path = ROOT / part
    return [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement names, at any depth (imports inside functions count too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append((node.lineno, node.module))
    return names


@pytest.mark.parametrize("layer,parts", [("core", CORE), ("workflows", ["workflows"])])
def test_layers_import_only_downwards(layer, parts):
    upward = [f"{path.relative_to(ROOT.parent)}:{line} imports {name}"
              for part in parts for path in _files(part) for line, name in _imports(path) if name.startswith(ABOVE[layer])]
    assert upward == []


def test_no_dynamic_imports_and_no_global_statements():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Global):
                found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} global {', '.join(node.names)}")
            if (path not in DYNAMIC_IMPORTS_ALLOWED and isinstance(node, ast.Attribute) and node.attr == "import_module"):
                found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} import_module")
    assert found == []
