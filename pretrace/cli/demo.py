"""`pretrace demo`: pre-train, fine-tune and trace a toy model end to end (a few minutes on a CPU)."""

from __future__ import annotations

from pretrace.cli import COMMANDS

from pretrace.cli.options import add_arguments, from_arguments


def register(subparsers) -> None:
    from pretrace.bench.settings import DemoSettings

    parser = subparsers.add_parser("demo", help=COMMANDS["demo"], description=__doc__)
    add_arguments(parser, DemoSettings)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from pretrace.bench.demo import DemoSettings, run_demo
    from pretrace.storage import read_jsonl_rows

    settings = from_arguments(DemoSettings, args)
    table = run_demo(settings)
    rows = read_jsonl_rows(f"{settings.out}/scores_ekfac/top_k.jsonl")
    for row in rows[:3]:
        print(f"\nquery: {row['prompt']!r} -> {row['completion']!r}")
        for doc in row["documents"][:3]:
            print(f"  {doc['rank']}. {doc['score']:+.3g}  {doc['text'][:90]}")
    print(f"\n{'method':<28} {'MRR':>6} {'recall@10':>10}")
    for label, metrics in table.items():
        print(f"{label:<28} {metrics['mrr']:>6.3f} {metrics['recall@10']:>10.3f}")
    print(f"\nresults in {settings.out}/results.json")
    return 0
