"""`pretrace score`: influence of training documents on queries (single- or multi-stage)."""

from __future__ import annotations

from pretrace.cli import COMMANDS
from pretrace.cli.checks import check_factor_folders, check_models, check_records
from pretrace.cli.options import add_arguments, from_arguments
from pretrace.errors import PretraceError
from pretrace.settings.model import ModelOptions
from pretrace.workflows.settings import ScoreSettings


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "score", help=COMMANDS["score"], description=__doc__,
        epilog="score(z, x) = ∇m(x)ᵀ P ∇ℓ(z): positive means up-weighting document z lowers the loss of the query's completion.",
    )
    for cls, title in ((ScoreSettings, "inputs, output and method"), (ModelOptions, "model loading and batching")):
        add_arguments(parser, cls, title=title)
    parser.add_argument_group("terminal output").add_argument("--show-top", type=int, default=0, metavar="K",
                        help="Also print each query's top K documents (all of them are in OUT/top_k.jsonl; `pretrace report OUT` shows them). (default: 0)")
    parser.set_defaults(handler=run, check=check)


def check(args, produced) -> None:
    """The settings and every input, before any work (see `pretrace.cli.checks`)."""
    from pretrace.workflows.score import check_model_options

    check_show_top(args)
    settings, options = from_arguments(ScoreSettings, args), from_arguments(ModelOptions, args)
    check_model_options(settings, options)
    check_models(produced, settings.model, settings.pretrained, settings.finetuned)
    check_factor_folders(produced, settings.factors, settings.pretrained_factors, settings.finetuned_factors)
    check_records(produced, options.fields(), queries=settings.queries, documents=settings.train)


def check_show_top(args) -> None:
    if args.show_top < 0:
        raise PretraceError(f"--show-top {args.show_top}: pass 0 (a summary only) or a positive number of documents per query.")


def run(args) -> int:
    from pretrace.storage import read_jsonl_rows
    from pretrace.workflows.score import score

    check_show_top(args)
    settings = from_arguments(ScoreSettings, args)
    result = score(settings, from_arguments(ModelOptions, args))
    print(f"scores [{result.scores.shape[0]} queries x {result.scores.shape[1]} documents] -> {settings.out}")
    if args.show_top == 0:
        print(f"each query's top {settings.outputs.top_k} documents: {settings.out}/top_k.jsonl (print them with --show-top K, "
              f"view them with `pretrace report {settings.out}`, load them with pretrace.load_scores)")
        return 0
    for row in read_jsonl_rows(f"{settings.out}/top_k.jsonl"):
        print(f"\nquery {row['query_id']}: {row['prompt']!r} -> {row['completion']!r}")
        for doc in row["documents"][: args.show_top]:
            print(f"  {doc['rank']:>3}. {doc['score']:+.4g}  {doc['text'][:100]!r}")
    return 0
