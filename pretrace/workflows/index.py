"""`pretrace index`: every training document's gradient stored once, built resumably beside --out and renamed in."""

from __future__ import annotations

from pathlib import Path

from pretrace.config import require_instance, require_path
from pretrace.scores.index import IndexSettings, build_index
from pretrace.data.records import check_source, source_sha256
from pretrace.storage import commit_folder, output_folder
from pretrace.modeling.adapters import model_folders
from pretrace.modeling.stage import ModelOptions, load_stage


def build_folder(out: Path) -> Path:
    """Where an unfinished index grows (its complete shards survive a kill); renamed to `out` when complete."""
    return out.parent / f".{out.name}.index-build"


def index(model: str | Path, train: str | Path, out: str | Path, options: ModelOptions | None = None,
          settings: IndexSettings | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Index the documents of `train` under the model folder `model` into `out`; returns the index's metadata."""
    model, train, out = require_path("model", model), require_path("train", train), Path(require_path("out", out))
    options = require_instance("options", options or ModelOptions(), ModelOptions)
    settings = require_instance("settings", settings or IndexSettings(), IndexSettings)
    with output_folder(out, overwrite, {**model_folders("--model", model), "--train": train}, command="index"):
        check_source(train, "training documents")
        stage = load_stage(model, options)
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
