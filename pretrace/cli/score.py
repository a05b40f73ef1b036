"""`pretrace score`: influence of training documents on queries (single- or multi-stage)."""

from __future__ import annotations

from pretrace.cli import COMMANDS

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
    parser.set_defaults(handler=run)


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
