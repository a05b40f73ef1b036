"""`pretrace index`: every training document's gradient stored once, built resumably beside --out and renamed in."""

from __future__ import annotations

from pathlib import Path

from pretrace.config import IN_MEMORY, require_instance, require_path
from pretrace.scores.index import IndexSettings, build_index
from pretrace.data.records import RecordSource, check_source, in_memory, source_sha256
from pretrace.storage import commit_folder, output_folder
from pretrace.modeling.adapters import model_folders
from pretrace.modeling.stage import ModelOptions, Stage, load_stage


def build_folder(out: Path) -> Path:
    """Where an unfinished index grows (its complete shards survive a kill); renamed to `out` when complete."""
    return out.parent / f".{out.name}.index-build"


def index(model: str | Path | Stage, train: RecordSource, out: str | Path, options: ModelOptions | None = None,
          settings: IndexSettings | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Index the documents of `train` (a path or records in memory) under `model` (a model folder loaded with
    `options`, or the `Stage` of a loaded model) into `out`; returns the index's metadata."""
    out = Path(require_path("out", out))
    model_name = IN_MEMORY if isinstance(model, Stage) else require_path("model", model)
    train_name = IN_MEMORY if in_memory(train) else require_path("train", train)
    options = require_instance("options", options or ModelOptions(), ModelOptions)
    settings = require_instance("settings", settings or IndexSettings(), IndexSettings)
    inputs = {flag: path for flag, path in {**model_folders("--model", model_name), "--train": train_name}.items() if path != IN_MEMORY}
    with output_folder(out, overwrite, inputs, command="index"):
        check_source(train, "training documents")
        stage = model if isinstance(model, Stage) else load_stage(model, options)
        used = stage.options  # as used: the default --max-length resolved against the model
        # the keys `score --index` compares (pretrace.workflows.score._check_index), so it names the flag that differs
        signature = {
            "model_fingerprint": stage.fingerprint, "documents_sha256": source_sha256(train),
            "max_length": used.max_length, "batch_size": used.batch_size, "dtype": used.dtype,
            "preset": used.preset, "modules_regex": used.modules, "attention_blocks": used.attention_blocks,
        }
        work = build_folder(out)
        meta = build_index(stage.model, stage.tracked, stage.document_batches(train)(), work, settings, signature,
                           num_batches=stage.document_batch_count(train), progress=progress)
        commit_folder(work, out, "index")
    return meta
