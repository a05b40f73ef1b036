"""`pretrace index`: every training document's gradient stored once, built resumably beside --out and renamed in."""

from __future__ import annotations

from pathlib import Path

from pretrace.config import IN_MEMORY, require_instance, require_path
from pretrace.progress import note
from pretrace.scores.index import IndexSettings, build_index
from pretrace.curvature.factors import Factors, check_factor_source
from pretrace.errors import PretraceError
from pretrace.methods.gradient import load_checked_factors
from pretrace.store.build import build_store, curvature_whitening
from pretrace.data.records import RecordSource, check_source, in_memory, source_sha256
from pretrace.storage import commit_folder, output_folder
from pretrace.modeling.adapters import model_folders
from pretrace.modeling.memory import exact_width, index_plan, plan_run
from pretrace.modeling.stage import ModelOptions, Stage, load_stage


def build_folder(out: Path) -> Path:
    """Where an unfinished index grows (its complete shards survive a kill); renamed to `out` when complete."""
    return out.parent / f".{out.name}.index-build"


def index(model: str | Path | Stage, train: RecordSource, out: str | Path, options: ModelOptions | None = None,
          settings: IndexSettings | None = None, overwrite: bool = False, progress: bool = True,
          factors: str | Path | Factors | None = None) -> dict:
    """Index the documents of `train` (a path or records in memory) under `model` (a model folder loaded with
    `options`, or the `Stage` of a loaded model) into `out`; returns the index's metadata. `factors` (of `model`,
    --storage sketch): whiten the sketches by its curvature, so they estimate preconditioned scores far better."""
    out = Path(require_path("out", out))
    model_name = IN_MEMORY if isinstance(model, Stage) else require_path("model", model)
    train_name = IN_MEMORY if in_memory(train) else require_path("train", train)
    options = require_instance("options", options or ModelOptions(), ModelOptions)
    settings = require_instance("settings", settings or IndexSettings(), IndexSettings)
    if factors is not None and settings.storage != "sketch":
        raise PretraceError(f"--factors has no effect with --storage {settings.storage}: it whitens the sketches of --storage sketch; drop it.")
    factors_name = None if factors is None else IN_MEMORY if isinstance(factors, Factors) else require_path("factors", factors)
    inputs = {flag: path for flag, path in {**model_folders("--model", model_name), "--train": train_name, "--factors": factors_name}.items()
              if path != IN_MEMORY}
    with output_folder(out, overwrite, inputs, command="index"):
        check_source(train, "training documents")
        options, plan = plan_run(None if isinstance(model, Stage) else model, model.options if isinstance(model, Stage) else options,
                                 lambda shapes, batch, length: index_plan(shapes, batch, length, settings.storage, settings.shard_batches,
                                                                          exact_width(shapes, settings.sketch_dim)),
                                 model=model.model if isinstance(model, Stage) else None)
        if plan is not None and progress:
            note(plan.describe())
        stage = model if isinstance(model, Stage) else load_stage(model, options)
        used = stage.options  # as used: the default --max-length resolved against the model
        # the keys `score --index` compares (pretrace.workflows.score._check_index), so it names the flag that differs
        signature = {
            "model_fingerprint": stage.fingerprint, "documents_sha256": source_sha256(train),
            "max_length": used.max_length, "batch_size": used.batch_size, "dtype": used.dtype,
            "preset": used.preset, "modules_regex": used.modules, "attention_blocks": used.attention_blocks,
        }
        work, batches, count = build_folder(out), stage.document_batches(train)(), stage.document_batch_count(train)
        if settings.storage == "sketch":
            whitening = _whitening(factors, stage, signature)
            meta = build_store(stage.model, stage.tracked, batches, work, settings, signature, num_batches=count, progress=progress, whitening=whitening)
        else:
            meta = build_index(stage.model, stage.tracked, batches, work, settings, signature, num_batches=count, progress=progress)
        commit_folder(work, out, "index")
    if plan is not None and progress:
        note(plan.report())
    return meta


def _whitening(factors: str | Path | Factors | None, stage: Stage, signature: dict) -> dict | None:
    """The whitening of a sketch store by the document model's factors, checked against the model; the signature
    then names the factors' contents (a resumed build must use the same ones)."""
    if factors is None:
        return None
    check_factor_source("--factors", factors, "--model", stage)
    loaded = load_checked_factors(factors, stage, "--factors")
    signature["factors_sha256"] = loaded.content_digest()
    return curvature_whitening(loaded)
