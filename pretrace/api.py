"""The Python front door: the commands as functions in one style.

Each function takes its inputs as paths *or* objects (a model folder or a loaded Hugging Face model with its
`tokenizer=`; a records file or a list of records (dicts, strings, `Document`s, `Query`s) or a
`datasets.Dataset`; a factor folder or `Factors`), its settings as keyword arguments named like the CLI flags
(`max_length=64`, `damping_factor=0.1`, `method="trak"`, `projection_dim=512`), and returns a result object.
`out` is optional wherever the result can live in memory: without it nothing is written and nothing resumes.

    factors = pretrace.fit(model, documents, tokenizer=tokenizer, max_length=128)
    result = pretrace.score(queries, documents, model=model, factors=factors, tokenizer=tokenizer)
    result.top(5), result.to_pandas()

Settings a run would not read are refused before any work, as on the CLI; an unknown keyword is a TypeError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pretrace.config import IN_MEMORY, flat_keys, from_flags
from pretrace.curvature import Factors, FitSettings
from pretrace.data.records import RecordSource, in_memory
from pretrace.gradients.task import Task
from pretrace.modeling.stage import ModelOptions, Stage, check_loaded, stage_of
from pretrace.scores.index import IndexSettings
from pretrace.scores.io import load_scores as read_score_folder
from pretrace.scores.result import ScoreResult
from pretrace.training.finetune import FinetuneSettings, finetune as finetune_settings
from pretrace.workflows.fit import fit as fit_stage
from pretrace.workflows.index import index as index_stage
from pretrace.workflows.score import ScoreSettings, build_context, score as score_settings
from pretrace.workflows.trace import TraceSettings, trace as trace_settings

Model = str | Path | torch.nn.Module  # a model folder, or a loaded causal language model (give its tokenizer)


def _split(function: str, settings: dict[str, Any], *classes: type) -> list[dict[str, Any]]:
    """`settings` shared out over the settings classes that declare them; a key none declares is a TypeError."""
    keys = [set(flat_keys(cls)) for cls in classes]
    unknown = sorted(set(settings) - set().union(*keys))
    if unknown:
        known = ", ".join(sorted(set().union(*keys)))
        raise TypeError(f"{function}() got unknown setting(s) {', '.join(map(repr, unknown))}; its settings are: {known}.")
    return [{key: value for key, value in settings.items() if key in own} for own in keys]


def _stage(model: Model | None, tokenizer: Any, options: ModelOptions, role: str) -> Stage | None:
    """The stage of a loaded model (None for a folder, which the command loads itself)."""
    if model is None or isinstance(model, (str, Path)):
        if tokenizer is not None and model is not None:
            raise TypeError(f"tokenizer= goes with a loaded {role}; {model} is a folder, whose own tokenizer is used.")
        return None
    return stage_of(model, tokenizer, options)


def _named(value: Any) -> str | None:
    """What a setting records for an input: its path, or IN_MEMORY for an object."""
    return None if value is None else str(value) if isinstance(value, (str, Path)) else IN_MEMORY


def fit(model: Model, data: RecordSource, out: str | Path | None = None, *, tokenizer: Any = None, task: Task | None = None,
        overwrite: bool = False, progress: bool = True, **settings: Any) -> Factors:
    """EK-FAC factors of `model` on `data` (documents, or fine-tuning prompt/completion pairs). Settings: those of
    `pretrace fit` (`FitSettings`: fisher, diagonal, factor_dtype, ...) and of the model (`ModelOptions`: preset,
    modules, max_length, batch_size, ...). `task`: the loss whose curvature is fitted (default: next-token)."""
    fit_keys, model_keys = _split("fit", settings, FitSettings, ModelOptions)
    options = from_flags(ModelOptions, model_keys)
    stage = _stage(model, tokenizer, options, "model")
    return fit_stage(stage or model, data, out, options, from_flags(FitSettings, fit_keys), overwrite, progress, task)


def score(queries: RecordSource, train: RecordSource, *, model: Model | None = None, factors: str | Path | Factors | None = None,
          pretrained: Model | None = None, finetuned: Model | None = None, pretrained_factors: str | Path | Factors | None = None,
          finetuned_factors: str | Path | Factors | None = None, tokenizer: Any = None, out: str | Path | None = None,
          task: Task | None = None, overwrite: bool = False, progress: bool = True, **settings: Any) -> ScoreResult:
    """Influence of every document of `train` on every query: single-stage (`model`, `factors`) or multi-stage
    (`pretrained` + `pretrained_factors`, `finetuned` + `finetuned_factors`; α read from the fine-tuned folder or
    from a model `finetune` returned, else `alpha=`). Settings: those of `pretrace score` (`ScoreSettings`: method
    and its own settings, damping, top_k, explain, ...) and of the models (`ModelOptions`). `tokenizer` is the loaded
    models' tokenizer (both stages share one). Returns scores named by their ids, with the top documents' explanations."""
    score_keys, model_keys = _split("score", settings, ScoreSettings, ModelOptions)
    options = from_flags(ModelOptions, model_keys)
    given: dict[str, Any] = {}
    for name, value in (("model", model), ("pretrained", pretrained), ("finetuned", finetuned)):
        stage = _stage(value, tokenizer, options, name)
        if stage is not None:
            given[name] = stage
    for name, value in (("queries", queries), ("train", train)):
        if in_memory(value):
            given[name] = value
    for name, value in (("factors", factors), ("pretrained_factors", pretrained_factors), ("finetuned_factors", finetuned_factors)):
        if isinstance(value, Factors):
            given[name] = value
    inputs = {"queries": queries, "train": train, "model": model, "factors": factors, "pretrained": pretrained, "finetuned": finetuned,
              "pretrained_factors": pretrained_factors, "finetuned_factors": finetuned_factors}
    paths = {name: _named(value) for name, value in inputs.items()}
    chosen = from_flags(ScoreSettings, score_keys, out=None if out is None else str(out), overwrite=overwrite, **paths)
    return score_settings(chosen, options, build_context(chosen, options, given, task, progress), given=given)


def finetune(model: Model, data: RecordSource, out: str | Path | None = None, *, alpha: float, tokenizer: Any = None,
             overwrite: bool = False, progress: bool = True, **settings: Any) -> torch.nn.Module:
    """Fine-tune with the proximity term α/2‖θ − θ_pt‖² (what multi-stage influence assumes) and return the
    fine-tuned model; a loaded `model` is copied first, so it stays the pre-trained one. Settings: those of
    `pretrace finetune` (`FinetuneSettings`: lr, epochs, batch_size, max_length, ...)."""
    given: dict[str, Any] = {}
    if not isinstance(model, (str, Path)):
        check_loaded(model, tokenizer)
        given["model"] = (model, tokenizer)
    if in_memory(data):
        given["data"] = data
    chosen = from_flags(FinetuneSettings, _split("finetune", settings, FinetuneSettings)[0], model=_named(model),
                        data=_named(data), out=None if out is None else str(out), alpha=alpha, overwrite=overwrite)
    return finetune_settings(chosen, progress, given)


def index(model: Model, train: RecordSource, out: str | Path, *, tokenizer: Any = None, factors: str | Path | Factors | None = None,
          overwrite: bool = False, progress: bool = True, **settings: Any) -> dict:
    """Every document's gradient stored once in `out`, for `score(..., index=out)`; returns the index's metadata.
    Settings: those of `pretrace index` (`IndexSettings`: storage, sketch_dim, search, ...) and of the model;
    `factors` (of `model`) whiten a sketch store."""
    index_keys, model_keys = _split("index", settings, IndexSettings, ModelOptions)
    options = from_flags(ModelOptions, model_keys)
    stage = _stage(model, tokenizer, options, "model")
    return index_stage(stage or model, train, out, options, from_flags(IndexSettings, index_keys), overwrite, progress, factors)


def trace(queries: str | Path, corpus: str | Path, out: str | Path, *, pretrained: str | Path, finetuned: str | Path,
          progress: bool = True, **settings: Any) -> dict:
    """The case study end to end on files: retrieve candidates from `corpus`, score them with multi-stage EK-FAC,
    rank each query's own and write results.jsonl, report.html and plots to `out` (a run folder that resumes).
    Settings: those of `pretrace trace` (`TraceSettings`) and of the models. Returns the run's summary."""
    trace_keys, model_keys = _split("trace", settings, TraceSettings, ModelOptions)
    chosen = from_flags(TraceSettings, trace_keys, queries=str(queries), corpus=str(corpus), out=str(out),
                        pretrained=str(pretrained), finetuned=str(finetuned))
    return trace_settings(chosen, from_flags(ModelOptions, model_keys), progress)


def load_scores(folder: str | Path) -> ScoreResult:
    """A score folder written by `pretrace score`, verified against its manifest (explanations: its top_k.jsonl)."""
    tensors, meta = read_score_folder(folder)
    return ScoreResult(tensors["scores"].double(), list(meta["query_ids"]), list(meta["document_ids"]), list(meta.get("module_names") or []),
                       per_module=tensors.get("per_module"), self_influence=tensors.get("self_influence"), timings=dict(meta.get("timings") or {}))
