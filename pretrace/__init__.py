"""pretrace: which training documents made this language model say that? (multi-stage EK-FAC influence)

The front door (`pretrace.api`) is lazy: `import pretrace` and `pretrace --help` load no torch; each name below is
imported from its module on first use. Inputs are paths or objects, settings are keywords named like the CLI flags:

    import pretrace
    factors = pretrace.fit(model, documents, tokenizer=tokenizer)          # a loaded model and a list of records
    result = pretrace.score(queries, documents, model=model, factors=factors, tokenizer=tokenizer)
    result.top(5)                                                          # or pretrace.score(..., out="scores/")
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from pretrace.version import __version__

# public name -> module that defines it
_EXPORTS = {
    "fit": "pretrace.api",
    "score": "pretrace.api",
    "finetune": "pretrace.api",
    "index": "pretrace.api",
    "trace": "pretrace.api",
    "load_scores": "pretrace.api",
    "ScoreResult": "pretrace.scores.result",
    "Explanation": "pretrace.scores.explanations",
    "Factors": "pretrace.curvature",
    "Task": "pretrace.gradients.task",
    "LanguageModelingTask": "pretrace.gradients.task",
    "PretraceCallback": "pretrace.workflows.proximal",
    "Document": "pretrace.data",
    "Query": "pretrace.data",
    "ModelOptions": "pretrace.modeling.stage",
    "FitSettings": "pretrace.curvature",
    "ScoreSettings": "pretrace.workflows.score",
    "FinetuneSettings": "pretrace.training",
    "IndexSettings": "pretrace.scores.index",
    "TraceSettings": "pretrace.workflows.trace",
    "PretraceError": "pretrace.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pretrace' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
