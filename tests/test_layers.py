"""The package's layers only look down: a declared bottom-to-top order of folders (and top-level modules), and every
import — at module level or inside a function, absolute or relative — of a module in a lower layer or its own; no
two files import each other, not even through others; nothing imports by name or keeps `global` state."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "pretrace"
# bottom to top; a layer may import itself and any layer below it
LAYERS = [
    ["errors.py", "version.py", "metrics.py", "extras.py", "progress.py"],
    ["config.py"],
    ["storage.py"],
    ["parallel"],
    ["settings"],
    ["data"],
    ["retrieval"],
    ["stages.py"],
    ["modeling"],
    ["gradients"],
    ["training"],
    ["curvature"],
    ["scores"],
    ["store"],
    ["methods"],
    ["baselines"],
    ["report"],
    ["workflows"],
    ["api.py"],
    ["bench"],
    ["cli"],
    ["__init__.py", "__main__.py"],
]
DYNAMIC_IMPORTS_ALLOWED = {ROOT / "__init__.py", ROOT / "cli" / "__init__.py"}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    """The index in LAYERS of a `pretrace...` module."""
    rest = module.split(".")[1:] or ["__init__"]
    for number, layer in enumerate(LAYERS):
        if f"{rest[0]}.py" in layer or rest[0] in layer:
            return number
    raise AssertionError(f"{module} is in no declared layer; add its folder to LAYERS")


def _is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every `pretrace` module an import statement names, at any depth, relative imports resolved."""
    package = _module(path).split(".") if path.name == "__init__.py" else _module(path).split(".")[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            names.append((node.lineno, module))
            names += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if _is_module(f"{module}.{alias.name}")]
    return [(line, name) for line, name in names if name == "pretrace" or name.startswith("pretrace.")]


def _files() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_every_import_looks_down_the_declared_layers():
    upward = []
    for path in _files():
        own = _layer(_module(path))
        for line, name in _imports(path):
            if _layer(name) > own:
                upward.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name} ({LAYERS[_layer(name)]} above {LAYERS[own]})")
    assert upward == []


def _resolve(name: str, modules: set[str]) -> str:
    """The file a dotted name is: itself, or the module it is an attribute of (a class, a function)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def test_no_two_files_import_each_other():
    modules = {_module(path) for path in _files()}
    graph = {_module(path): {_resolve(name, modules) for _, name in _imports(path)} - {_module(path)} for path in _files()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_dynamic_imports_and_no_global_statements():
    found = []
    for path in _files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Global):
                found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} global {', '.join(node.names)}")
            if (path not in DYNAMIC_IMPORTS_ALLOWED and isinstance(node, ast.Attribute) and node.attr == "import_module"):
                found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} import_module")
    assert found == []


def _process_wide(tree: ast.AST) -> list[int]:
    """Lines that swap sys.stdout/sys.stderr or change the warning filters outside a `warnings.catch_warnings()` block."""
    local = {id(node) for block in ast.walk(tree) if isinstance(block, ast.With)
             and any("catch_warnings" in ast.unparse(item.context_expr) for item in block.items) for node in ast.walk(block)}
    return [node.lineno for node in ast.walk(tree) if id(node) not in local and (
        isinstance(node, ast.Assign) and any(ast.unparse(t) in ("sys.stdout", "sys.stderr") for t in node.targets)
        or isinstance(node, ast.Call) and ast.unparse(node.func) in ("warnings.simplefilter", "warnings.filterwarnings"))]


def test_the_library_never_configures_the_process():
    """No module swaps sys.stdout or silences warnings for the whole process: the CLI alone configures its process."""
    found = [f"{path.relative_to(ROOT.parent)}:{line}" for path in _files() if path.parent.name != "cli"
             for line in _process_wide(ast.parse(path.read_text(), str(path)))]
    assert found == []
