"""`pretrace index`: store every training document's gradient once, for repeated `pretrace score --index`."""

from __future__ import annotations

from dataclasses import dataclass

from pretrace.cli.options import add_arguments, from_arguments
from pretrace.config import option
from pretrace.scores.index import IndexSettings
from pretrace.workflows.common import ModelOptions


@dataclass
class IndexPaths:
    model: str = option(help="The model folder whose document gradients are stored (single-stage: --model of `pretrace score`; multi-stage: --pretrained).")
    train: str = option(help="JSONL training documents: {'text', optional 'id'}; `pretrace score --index` must be given the same file.")
    out: str = option(help="Index folder (index.json + shard-*.safetensors); rerunning the same command resumes an interrupted build.")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "index", help="store document gradients for repeated scoring", description=__doc__,
        epilog="Then: pretrace score --index OUT --train TRAIN ... (the same model selection and --max-length).",
    )
    for cls in (IndexPaths, ModelOptions, IndexSettings):
        add_arguments(parser, cls)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from pathlib import Path

    from pretrace.errors import PretraceError
    from pretrace.scores.index import build_index
    from pretrace.storage import file_sha256
    from pretrace.workflows.common import load_stage

    paths, options = from_arguments(IndexPaths, args), from_arguments(ModelOptions, args)
    if not Path(paths.train).is_file():
        raise PretraceError(f"{paths.train}: no such file; pass a JSONL file of training documents.")
    stage = load_stage(paths.model, options)
    signature = {
        "model_fingerprint": stage.fingerprint, "documents_sha256": file_sha256(paths.train),
        "max_length": options.max_length, "batch_size": options.batch_size, "dtype": options.dtype,
    }
    meta = build_index(stage.model, stage.tracked, stage.document_batches(paths.train)(), paths.out, from_arguments(IndexSettings, args),
                       signature, num_batches=stage.document_batch_count(paths.train))
    print(f"indexed {len(meta['document_ids'])} documents over {len(meta['modules'])} modules ({meta['storage']}) -> {paths.out}")
    return 0
