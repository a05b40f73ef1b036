"""pretrace: which training documents made this language model say that? (multi-stage EK-FAC influence)

The front door is lazy: `import pretrace` and `pretrace --help` load no torch; each name below is imported
from its module on first use.

    import pretrace
    pretrace.fit("model/", "train.jsonl", "factors/")
    result = pretrace.score(pretrace.ScoreSettings(model="model/", factors="factors/", queries="q.jsonl",
                                                   train="train.jsonl", out="scores/"))
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from pretrace.version import __version__

# public name -> module that defines it
_EXPORTS = {
    "fit": "pretrace.workflows.fit",
    "score": "pretrace.workflows.score",
    "ScoreSettings": "pretrace.workflows.score",
    "ScoreResult": "pretrace.scores",
    "Explain": "pretrace.scores.explanations",
    "Explanation": "pretrace.scores.explanations",
    "ModelOptions": "pretrace.modeling.stage",
    "FitSettings": "pretrace.curvature",
    "Factors": "pretrace.curvature",
    "finetune": "pretrace.training",
    "FinetuneSettings": "pretrace.training",
    "trace": "pretrace.workflows.trace",
    "TraceSettings": "pretrace.workflows.trace",
    "Document": "pretrace.data",
    "Query": "pretrace.data",
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
