"""`pretrace trace`: retrieve candidates from a corpus, score them with multi-stage influence, and report the
pre-training documents most responsible for a fine-tuned model's answers (results.jsonl, report.html, plots)."""

from __future__ import annotations

from pretrace.cli import COMMANDS

from pretrace.cli.checks import check_factor_folders, check_models, check_records
from pretrace.cli.options import add_arguments, from_arguments
from pretrace.settings.model import ModelOptions
from pretrace.workflows.settings import TraceSettings


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "trace", help=COMMANDS["trace"],
        description=__doc__,
        epilog="Without --pretrained-factors / --finetuned-factors both are fitted and cached under --out. "
               "Rerunning with the same --out reuses every finished stage.",
    )
    for cls, title in ((TraceSettings, "inputs, output and method"), (ModelOptions, "model loading and batching")):
        add_arguments(parser, cls, title=title)
    parser.set_defaults(handler=run, check=check)


def check(args, produced) -> None:
    """The settings and every input, before any work (see `pretrace.cli.checks`)."""
    from pretrace.cli.checks import produced_by_earlier
    from pretrace.workflows.trace import read_trace_queries

    settings, options = from_arguments(TraceSettings, args), from_arguments(ModelOptions, args)
    check_models(produced, settings.pretrained, settings.finetuned)
    check_factor_folders(produced, settings.pretrained_factors, settings.finetuned_factors)
    check_records(produced, options.fields(), documents=settings.corpus)
    if not produced_by_earlier(settings.queries, produced):
        read_trace_queries(settings.queries, options.fields())


def run(args) -> int:
    from pretrace.workflows.trace import trace

    settings = from_arguments(TraceSettings, args)
    summary = trace(settings, from_arguments(ModelOptions, args))
    timings = ", ".join(f"{name.removesuffix('_seconds')} {seconds:.0f}s" for name, seconds in summary["timings"].items()
                        if not name.endswith("_cpu_seconds"))
    print(f"{summary['queries']} queries, {summary['distinct_candidates']} distinct candidates scored ({timings})")
    if summary["retrieval_recall"] is not None:
        print(f"evidence recall: {summary['retrieval_recall']:.3f} within the candidates, "
              f"{summary['evidence_in_top_k']:.3f} within the top {settings.top_k}")
    print(f"report -> {settings.out}/report.html")
    return 0
