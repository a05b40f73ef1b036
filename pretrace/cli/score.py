"""`pretrace score`: influence of training documents on queries (single- or multi-stage)."""

from __future__ import annotations

from pretrace.cli import COMMANDS

from pretrace.cli.checks import check_factor_folders, check_models, check_records
from pretrace.cli.options import add_arguments, from_arguments
from pretrace.modeling.stage import ModelOptions
from pretrace.workflows.score import ScoreSettings


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "score", help=COMMANDS["score"], description=__doc__,
        epilog="score(z, x) = ∇m(x)ᵀ P ∇ℓ(z): positive means up-weighting document z lowers the loss of the query's completion.",
    )
    for cls in (ScoreSettings, ModelOptions):
        add_arguments(parser, cls)
    parser.set_defaults(handler=run, check=check)


def check(args, produced) -> None:
    """The settings and every input, before any work (see `pretrace.cli.checks`)."""
    from pretrace.workflows.score import check_model_options

    settings, options = from_arguments(ScoreSettings, args), from_arguments(ModelOptions, args)
    check_model_options(settings, options)
    check_models(produced, settings.model, settings.pretrained, settings.finetuned)
    check_factor_folders(produced, settings.factors, settings.pretrained_factors, settings.finetuned_factors)
    check_records(produced, options.fields(), queries=settings.queries, documents=settings.train)


def run(args) -> int:
    from pretrace.storage import read_jsonl_rows
    from pretrace.workflows.score import score

    settings = from_arguments(ScoreSettings, args)
    result = score(settings, from_arguments(ModelOptions, args))
    print(f"scores [{result.scores.shape[0]} queries x {result.scores.shape[1]} documents] -> {settings.out}")
    for row in read_jsonl_rows(f"{settings.out}/top_k.jsonl"):
        print(f"\nquery {row['query_id']}: {row['prompt']!r} -> {row['completion']!r}")
        for doc in row["documents"][: min(5, settings.outputs.top_k)]:
            print(f"  {doc['rank']:>3}. {doc['score']:+.4g}  {doc['text'][:100]!r}")
    return 0
