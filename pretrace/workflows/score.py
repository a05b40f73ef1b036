"""`pretrace score`: influence of training documents on queries, single- or multi-stage, any method."""

from __future__ import annotations

import math
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from pretrace.progress import note
from pretrace.version import __version__
from pretrace.curvature.placement import place_factors
from pretrace.config import IN_MEMORY, changed, require_instance, to_dict
from pretrace.data.batching import encode_queries, short_document_ids
from pretrace.data.records import check_source, read_queries, validate_documents
from pretrace.errors import PretraceError
from pretrace.gradients.task import Task
from pretrace.modeling.adapters import MERGED, model_folders
from pretrace.baselines.trak import ensemble_folder
from pretrace.baselines.trak_ensemble import ENSEMBLE_COMMAND
from pretrace.methods.base import Attributor, ScoringContext
from pretrace.methods.config import METHODS
from pretrace.workflows.registry import make_attributor
from pretrace.curvature.factors import check_factor_source
from pretrace.methods.explain import explain_top, explanation_counts, top_rows
from pretrace.settings.records import FIELD_FLAGS
from pretrace.modeling.modules import ALL_PARAMETERS, only_linear_modules
from pretrace.parallel import group
from pretrace.scores.io import save_scores
from pretrace.scores.explanations import Explain
from pretrace.scores.result import ScoreResult
from pretrace.scores.self_influence import self_influence
from pretrace.scores.index import check_index, read_index, score_index
from pretrace.store import CorpusStore
from pretrace.scores.plan import ScoringPlan
from pretrace.scores.checkpoint import ScoringCheckpoint
from pretrace.stages import Folder, Source, digest
from pretrace.storage import atomic_directory, check_cache, checkpoint_folder, output_folder
from pretrace.training.finetune import FINETUNE_RECORD, read_finetune_record
from pretrace.modeling.memory import plan_run, score_plan
from pretrace.modeling.stage import ModelOptions, Stage, iter_source, load_stage, match_stages
from pretrace.workflows.settings import Outputs, ScoreSettings




@dataclass(frozen=True)
class Inputs:
    """A run's inputs as its work reads them: the object the Python API was handed (its setting then records
    IN_MEMORY: records, a model's `Stage`, `Factors`), else the setting's own path."""

    settings: ScoreSettings
    given: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        misplaced = sorted(name for name in self.given if getattr(self.settings, name, None) != IN_MEMORY)
        if misplaced:
            raise TypeError(f"objects given for {misplaced}, whose settings do not record {IN_MEMORY!r}")

    def __getitem__(self, name: str) -> Any:
        return self.given[name] if name in self.given else getattr(self.settings, name)

    def stage(self, name: str, options: ModelOptions, base: str | None = None) -> Stage:
        """The model stage of setting `name`: handed over, or loaded from its folder."""
        if name in self.given:
            return self.given[name]
        return load_stage(getattr(self.settings, name), options, base=None if base == IN_MEMORY else base)


def _plan(settings: ScoreSettings, options: ModelOptions, inputs: Inputs, queries: int, documents: int, progress: bool):
    """The run's memory plan (refused over the budget; `--batch-size auto` resolved), before any model is loaded."""
    document_model = "model" if not settings.is_multi_stage else "pretrained"
    given = inputs.given.get(document_model)
    stages = 2 if settings.is_multi_stage else 1
    options, plan = plan_run(None if given is not None else getattr(settings, document_model), options,
                             lambda shapes, batch, length: score_plan(shapes, batch, length, queries, documents, stages, settings.query_rank,
                                                                      settings.outputs.per_module),
                             model=None if given is None else given.model)
    if plan is not None and progress:
        note(plan.describe())
    return options, plan


def _finetune_record(path: str, stage: Stage) -> dict | None:
    """What `finetune` recorded of a stage: in its folder, or on a model it returned in memory."""
    return getattr(stage.model, "pretrace_finetune", None) if path == IN_MEMORY else read_finetune_record(path)


def _check_pair(settings: ScoreSettings, pretrained: Stage, finetuned: Stage) -> float:
    """Refuse a fine-tuned model whose recorded base is another model, or a different tokenizer; return α."""
    if pretrained.tokenizer.get_vocab() != finetuned.tokenizer.get_vocab():
        raise PretraceError("the pre-trained and fine-tuned tokenizers differ; both stages must tokenize documents the same way.")
    record, swapped = _finetune_record(settings.finetuned, finetuned), _finetune_record(settings.pretrained, pretrained)
    if record is None and swapped is not None and swapped.get("pretrained_fingerprint") == finetuned.fingerprint:
        raise PretraceError(
            f"--pretrained {settings.pretrained} was fine-tuned from --finetuned {settings.finetuned} (its {FINETUNE_RECORD} says so): "
            "the stages are swapped; swap --pretrained with --finetuned and --pretrained-factors with --finetuned-factors."
        )
    if record is not None and not settings.force:
        base = record.get("pretrained_fingerprint")
        if base is not None and base != pretrained.fingerprint:
            raise PretraceError(
                f"{settings.finetuned} records a different pre-trained model than {settings.pretrained} "
                "(fingerprint mismatch); pass the model it was fine-tuned from, or --force."
            )
    if not settings.method.scaled_by_alpha:
        return None
    alpha = settings.alpha if settings.alpha is not None else (record or {}).get("alpha")
    if alpha is None:
        raise PretraceError(f"no --alpha given and {settings.finetuned} has no {FINETUNE_RECORD}; pass the proximity strength used in fine-tuning.")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
        raise PretraceError(f"{settings.finetuned}/{FINETUNE_RECORD} records alpha={alpha!r}, which the multi-stage formula cannot use (it needs a finite α > 0); "
                            "pass --alpha, or fine-tune again with a finite --alpha > 0.")
    return float(alpha)


def check_model_options(settings: ScoreSettings, options: ModelOptions) -> None:
    """Refuse model options the run would not read: every one for the text methods (no model is loaded; --device
    and --batch-size aside for the embedding model), and --factors-device cpu when the model already runs on the CPU."""
    method = settings.method
    if not method.uses_model:
        used = ("--device", "--batch-size") if method.name == "embedding" else ()
        unread = [flag for flag in changed(options) if flag not in used and flag not in FIELD_FLAGS]
        if unread:
            raise PretraceError(f"{', '.join(unread)} {'has' if len(unread) == 1 else 'have'} no effect with --method {method.name}, "
                                "which scores the texts' words and loads no model; drop them.")
    if method.factors and options.preset == ALL_PARAMETERS:
        supported = ", ".join(name for name, config in METHODS.items() if config.uses_model and not config.factors)
        raise PretraceError(f"--method {method.name} needs Kronecker-factored linear modules, but --preset {ALL_PARAMETERS} also tracks "
                            f"embeddings, norms and the LM head; use --preset all, mlp or attention, or a method that supports --preset "
                            f"{ALL_PARAMETERS} ({supported}).")
    if settings.placement.factors_device == "cpu" and options.torch_device().type == "cpu" and options.device_map is None:
        raise PretraceError("--factors-device cpu has no effect: the model already runs on the CPU (--device "
                            f"{options.device}); drop it, or run the model on a GPU.")


def build_context(settings: ScoreSettings, options: ModelOptions, given: Mapping[str, Any] | None = None,
                  task: Task | None = None, progress: bool = True) -> ScoringContext:
    """Validate every input (queries, every training document, the models, their factors and their pairing) before
    any work; the context carries the α the run uses (given, or recorded by `pretrace finetune`). `given`: the
    objects the Python API was handed instead of paths (see `Inputs`); `task`: the queries' measurement; `progress`:
    whether the work draws progress bars."""
    check_model_options(settings, options)
    if task is not None and not settings.method.preconditions_queries:
        readers = ", ".join(name for name, method in METHODS.items() if method.preconditions_queries)
        raise PretraceError(f"a task (the queries' measurement) is read by the methods that precondition query gradients ({readers}), "
                            f"not by --method {settings.method.name}; drop it, or choose one of those.")
    inputs, fields = Inputs(settings, given or {}), options.fields()
    queries = read_queries(inputs["queries"], fields=fields)
    train = inputs["train"]
    check_source(train, "training documents")
    count = validate_documents(train, fields)
    documents = Path(train) if isinstance(train, str) else train
    diagonal = settings.method.name == "diagonal"
    if not settings.method.uses_model:
        return ScoringContext(None, None, documents, queries, options=options, progress=progress)
    options, plan = _plan(settings, options, inputs, len(queries), count, progress)
    if not settings.is_multi_stage:
        stage = inputs.stage("model", options)
        check_factor_source("--factors", inputs["factors"], "--model", stage, diagonal)
        context = ScoringContext(stage, stage, documents, queries, options=options, task=task, progress=progress)
    else:
        if options.adapter != MERGED:
            raise PretraceError("multi-stage influence needs the fine-tuned model's full weights: drop --adapter adapter (an adapter "
                                "folder as --finetuned is merged into its base, --pretrained when its recorded base is not local).")
        pretrained, finetuned = inputs.stage("pretrained", options), inputs.stage("finetuned", options, base=settings.pretrained)
        match_stages(pretrained, finetuned)
        alpha = _check_pair(settings, pretrained, finetuned)
        check_factor_source("--pretrained-factors", inputs["pretrained_factors"], "--pretrained", pretrained, diagonal)
        check_factor_source("--finetuned-factors", inputs["finetuned_factors"], "--finetuned", finetuned, diagonal)
        context = ScoringContext(finetuned, pretrained, documents, queries, options=options, alpha=alpha, task=task, progress=progress)
    context.extra["memory_plan"] = plan
    for _ in encode_queries(context.query_stage.tokenizer, queries, context.query_stage.options.max_length):
        pass  # a query with nothing to measure fails here, not after the documents' pass
    if settings.index:
        check_index(settings.index, context.document_stage, train, settings.train)
        if settings.outputs.per_module and read_index(settings.index)["storage"] == "sketch":
            raise PretraceError(f"--per-module has no effect with --index {settings.index}, a corpus store (one sketch per document, "
                                "not per module); drop it, or index with --storage exact or factored.")
    if settings.outputs.per_token and not only_linear_modules(context.document_stage.tracked):
        raise PretraceError("--per-token needs gradients over linear modules only: drop --per-token, or --preset all-parameters.")
    return context


def _index_scores(settings: ScoreSettings, attributor: Attributor, context: ScoringContext) -> ScoreResult:
    """Queries against `pretrace index`'s stored document gradients (checked against the documents and their model by
    _check_index); every rank scores every query with the attributor's own prepared queries (kept for the explanations)."""
    ids, weights = attributor.precondition_queries(replace(context, plan=ScoringPlan()))
    if read_index(settings.index)["storage"] == "sketch":  # the corpus store: sketched scores, an estimate of the exact ones
        result = CorpusStore(settings.index).score_result(weights, ids)
    else:
        result = score_index(settings.index, weights, ids, per_module=settings.outputs.per_module, progress=context.progress)
    if attributor.query_rank_error is not None:
        result.timings["query_low_rank_relative_error"] = attributor.query_rank_error
    return result


def _signature(settings: ScoreSettings, context: ScoringContext, explain: Explain | None, given: Mapping[str, Any]) -> str:
    """Everything a scoring pass's batches depend on, for its checkpoint: the settings (not where the result goes nor
    how often it is saved), the models' weights, the factors, the queries, the documents' contents, the ranks and the
    explanations asked."""
    documents = (Source(context.documents) if isinstance(context.documents, (str, Path))
                 else [(d.id, d.text) for d in iter_source(context.documents, context.options.fields())])
    folders = [settings.factors, settings.pretrained_factors, settings.finetuned_factors, context.query_stage.path, context.document_stage.path]
    in_memory = [given[name].content_digest() for name in ("factors", "pretrained_factors", "finetuned_factors") if name in given]
    method = settings.method
    data = [Source(source) for source in (getattr(method, "fit_data", None), getattr(method, "finetuned_fit_data", None),
                                          getattr(method, "train_data", None)) if source]
    recorded = to_dict(settings)
    for transient in ("out", "overwrite"):
        recorded.pop(transient)
    recorded["outputs"].pop("checkpoint_every")
    return digest(
        settings=recorded, alpha=context.alpha,
        options=to_dict(context.document_stage.options), models=[context.query_stage.fingerprint, context.document_stage.fingerprint],
        folders=[Folder(folder) for folder in folders if folder and Path(folder).is_dir()],  # factors, and the models' tokenizers
        data=data, queries=[(q.id, q.prompt, q.completion) for q in context.queries], documents=documents,
        world=group.world_size(), explain=None if explain is None else [explain.k, explain.among], version=__version__,
        **({"factors_in_memory": in_memory} if in_memory else {}),
    )


def score(settings: ScoreSettings, options: ModelOptions | None = None, context: ScoringContext | None = None,
          attributor: Attributor | None = None, explain: Explain | None = None, given: Mapping[str, Any] | None = None) -> ScoreResult:
    """Compute scores and save them to `settings.out` (when set); returns the result (scores float64 `[Q, N]`, float32
    memory-mapped with --scores-on-disk), with the top documents' explanations in `result.explanations`.

    A caller that passes an unfitted `attributor` (made by `make_attributor` from `settings`) gets it back fitted, to
    reuse without fitting again; one that passes `explain` (gradient methods) gets those pairs' explanations taken in
    the same pass too. `given`: objects handed over instead of paths (see `Inputs`). Under torchrun every rank scores
    its share of the documents and holds the whole result; rank 0 writes it."""
    require_instance("settings", settings, ScoreSettings)
    options = require_instance("options", options or ModelOptions(), ModelOptions)
    given, inputs = given or {}, _inputs(settings)
    group.initialize()
    folder = nullcontext() if settings.out is None else output_folder(settings.out, settings.overwrite, inputs, command="score", lock=group.is_main())
    with folder:
        _check_caches(settings, inputs)
        return _score(settings, options, context or build_context(settings, options, given), attributor, explain, given)


def _inputs(settings: ScoreSettings) -> dict[str, str | None]:
    """The paths `score` only reads (an adapter's base model included), which no folder it writes may be, lie
    inside (folders) or contain."""
    inputs = {}
    for flag in ("--model", "--pretrained", "--finetuned"):
        inputs.update(model_folders(flag, getattr(settings, flag.removeprefix("--")), base=settings.pretrained))
    inputs.update({flag: getattr(settings, flag.removeprefix("--").replace("-", "_")) for flag in (
        "--factors", "--pretrained-factors", "--finetuned-factors", "--index", "--queries", "--train")})
    method = settings.method
    inputs.update({"--fit-data": getattr(method, "fit_data", None), "--finetuned-fit-data": getattr(method, "finetuned_fit_data", None),
                   "--trak-train-data": getattr(method, "train_data", None),
                   "--embedding-model": getattr(method, "model", None) if method.name == "embedding" else None})
    for number, folder in enumerate((getattr(method, "models", None) or "").split(",")):
        inputs.update(model_folders(f"--trak-models[{number}]", folder.strip() or None))
    return {flag: path for flag, path in inputs.items() if path != IN_MEMORY}


def _check_caches(settings: ScoreSettings, inputs: dict[str, str | None]) -> None:
    """The folders `score` both reads and writes (a TRAK ensemble, a BM25 or embedding index), checked before any work
    like --out: never an input, never inside --out, never a folder pretrace did not write."""
    method = settings.method
    caches = {"--trak-ensemble-dir": (ENSEMBLE_COMMAND, ensemble_folder(method, settings.out) if getattr(method, "ensemble", 0) else None),
              "--text-index": (f"{method.name}-index", getattr(method, "index", None) if not method.uses_model else None)}
    for flag, (command, folder) in caches.items():
        if folder is not None:
            check_cache(folder, command, flag, inputs, {} if settings.out is None else {"--out": settings.out})


def _score(settings: ScoreSettings, options: ModelOptions, context: ScoringContext, attributor: Attributor | None,
           explain: Explain | None, given: Mapping[str, Any]) -> ScoreResult:
    out, outputs, gradients = None if settings.out is None else Path(settings.out), settings.outputs, settings.method.preconditions_queries
    attributor = attributor or make_attributor(settings, context.alpha, given)
    too_short = short_document_ids(context.document_stage.tokenizer, iter_source(context.documents, options.fields())) if attributor.reads_document_loss else []
    explained = _explained(outputs, gradients, context)
    # a caller's `explain` (trace: among each query's candidates) is what the pass keeps; top_k.jsonl's pairs it misses are rescored
    streamed = explain or (Explain(outputs.top_k) if explained else None)
    resumable = gradients and not settings.index and out is not None  # the signature hashes the documents: one-off cost, before fitting
    checkpoint = ScoringCheckpoint(checkpoint_folder(out), _signature(settings, context, streamed, given), outputs.checkpoint_every) if resumable else None
    start = time.perf_counter()
    attributor.fit(context)
    if gradients:
        attributor.preconditioner = place_factors(attributor.preconditioner, [t.name for t in context.document_stage.tracked],
                                                  settings.placement.factors_device, settings.placement.shard_factors)
    fitted = time.perf_counter()
    spill = out.parent / f".{out.name}.scores" if outputs.scores_on_disk else None
    context = replace(context, plan=ScoringPlan(settings.placement.shard, spill, checkpoint))
    result = _scores(settings, attributor, context, streamed, too_short)
    scored = time.perf_counter()
    top, pairs, details = explain_top(attributor, context, result, outputs.top_k, explained)
    result.record_phases(start, fitted, scored)
    metadata = _metadata(settings, context, attributor, result, too_short, pairs if explained else None)
    result.explanations = {**(result.explanations or {}), **(details or {})} if details else result.explanations
    if out is not None and group.is_main():
        with atomic_directory(out, "score", overwrite=True, discard=[checkpoint_folder(out)]) as tmp:
            save_scores(tmp, result, metadata, top_rows(context, result, top, details))
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)  # the result's memory maps stay valid
    group.barrier()
    if context.extra.get("memory_plan") is not None and context.progress:
        note(context.extra["memory_plan"].report())
    return result


def _explained(outputs: Outputs, gradients: bool, context: ScoringContext) -> bool:
    """Whether top_k.jsonl gets per-token explanations: asked, and possible (a gradient method over linear modules)."""
    explained = outputs.explain and gradients and only_linear_modules(context.document_stage.tracked)
    if outputs.explain and gradients and not explained:
        warnings.warn("top_k.jsonl has no per-token explanations: they exist for linear modules only, not for every parameter of --preset all-parameters.", stacklevel=3)
    return explained


def _scores(settings: ScoreSettings, attributor: Attributor, context: ScoringContext, streamed: Explain | None, too_short: list[str]) -> ScoreResult:
    """The scores of the fitted `attributor`: from --index, or the one document pass (explanations kept on the way),
    with self-influence when asked; 0 for the documents too short to have a loss; refused when all underflowed."""
    outputs = settings.outputs
    if settings.index:
        result = _index_scores(settings, attributor, context)
    elif not settings.method.preconditions_queries:
        result = attributor.score(context, per_module=outputs.per_module)
    else:
        result = attributor.score(context, per_module=outputs.per_module, per_token=outputs.per_token, explain=streamed)
    if outputs.self_influence:
        docs = context.document_stage
        _, result.self_influence = self_influence(docs.model, docs.tracked, attributor.preconditioner, docs.document_batches(context.documents)(), progress=context.progress)
    if too_short:
        result.zero_documents(set(too_short))
        warnings.warn(f"{len(too_short)} of {len(result.document_ids)} documents have fewer than 2 tokens (nothing to predict): their scores are 0, "
                      "and scores.json lists them as too_short.", stacklevel=3)
    if settings.method.preconditions_queries:
        damping = settings.damping
        result.require_nonzero(f"--damping {damping.absolute}, --damping-factor {damping.relative}, --alpha {settings.alpha}")
    return result


def _metadata(settings: ScoreSettings, context: ScoringContext, attributor: Attributor, result: ScoreResult, too_short: list[str],
              pairs: list[tuple[int, int]] | None) -> dict:
    return {
        "method": settings.method.name,
        "multi_stage": settings.is_multi_stage,
        "settings": to_dict(settings),
        "alpha": context.alpha,
        "options": to_dict(context.document_stage.options if context.document_stage is not None else context.options),  # as used
        "hyperparameters": attributor.hyperparameters(),
        "too_short": too_short,
        "timings": result.timings,
        "explanations": explanation_counts(pairs, result.explanations) if pairs is not None else None,
        "score_meaning": "score(z, x) = grad m(x)^T P grad loss(z); positive: up-weighting document z lowers the query's completion loss",
        **({"memory_plan": context.extra["memory_plan"].record()} if context.extra.get("memory_plan") is not None else {}),
    }
