"""`pretrace` command line: one module per sub-command, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

from pretrace.errors import PretraceError

COMMANDS = ["fit", "score", "index", "inspect", "finetune", "trace", "report", "demo", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrace",
        description="Influence functions for causal LMs: which training documents made the model say that?",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"pretrace.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except PretraceError as exc:
        print(f"pretrace: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pretrace: interrupted; re-run the same command to resume.", file=sys.stderr)
        return 130
