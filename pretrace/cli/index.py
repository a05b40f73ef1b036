"""`pretrace index`: store every training document's gradient once, for repeated `pretrace score --index`."""

from __future__ import annotations

from pretrace.cli import COMMANDS

from dataclasses import dataclass

from pretrace.cli.checks import check_models, check_records
from pretrace.cli.options import add_arguments, from_arguments
from pretrace.config import option
from pretrace.settings.scores import IndexSettings
from pretrace.settings.model import ModelOptions


@dataclass
class IndexPaths:
    model: str = option(help="The model folder whose document gradients are stored (single-stage: --model of `pretrace score`; multi-stage: --pretrained).")
    train: str = option(help="JSONL training documents: {'text', optional 'id'}; `pretrace score --index` must be given the same file.")
    out: str = option(help="Index folder (index.json + shard-*.safetensors); rerunning the same command resumes an interrupted build.")
    overwrite: bool = option(False, help="Replace an existing non-empty --out folder (once the new index is complete).")
    factors: str | None = option(None, help="--storage sketch: factors of --model (from `pretrace fit`) whose curvature whitens the sketches, so that they estimate preconditioned (EK-FAC, multi-stage) scores far better than raw ones.")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "index", help=COMMANDS["index"], description=__doc__,
        epilog="Then: pretrace score --index OUT --train TRAIN ... (the same model selection and --max-length).",
    )
    for cls, title in ((IndexPaths, "inputs and output"), (ModelOptions, "model loading and batching"), (IndexSettings, "the index")):
        add_arguments(parser, cls, title=title)
    parser.set_defaults(handler=run, check=check)


def check(args, produced) -> None:
    """The settings and every input, before any work (see `pretrace.cli.checks`)."""
    paths, options = from_arguments(IndexPaths, args), from_arguments(ModelOptions, args)
    from_arguments(IndexSettings, args)
    check_models(produced, paths.model)
    check_records(produced, options.fields(), documents=paths.train)


def run(args) -> int:
    from pretrace.workflows.index import index

    paths = from_arguments(IndexPaths, args)
    meta = index(paths.model, paths.train, paths.out, from_arguments(ModelOptions, args), from_arguments(IndexSettings, args), paths.overwrite,
                 factors=paths.factors)
    print(f"indexed {len(meta['document_ids'])} documents over {len(meta['modules'])} modules ({meta['storage']}) -> {paths.out}")
    return 0
