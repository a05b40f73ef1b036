"""`pretrace` command line: one module per sub-command, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from typing import Iterable

from pretrace.errors import PretraceError

COMMANDS = {  # name -> summary: `pretrace --help` lists them without importing any command (nor torch)
    "fit": "fit EK-FAC curvature factors",
    "score": "score training documents against queries",
    "index": "store document gradients for repeated scoring",
    "inspect": "describe a factor or score folder",
    "finetune": "fine-tune a model on prompt/completion pairs with a proximity term",
    "trace": "case study: the corpus documents behind a fine-tuned model's answers, as an HTML report",
    "report": "HTML report and plots of a score folder",
    "run": "run several commands from one pipeline file, in one process",
    "demo": "run the multi-stage pipeline on a toy world",
    "bench": "run a benchmark of the attribution methods",
}
RESUMABLE = {"fit", "index", "trace", "run", "demo", "bench"}  # they checkpoint or cache their stages beside or in --out


def build_parser(full: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the commands in `full` (all when None) get their flags, the others just their summary."""
    parser = argparse.ArgumentParser(
        prog="pretrace",
        description="Influence functions for causal LMs: which training documents made the model say that?",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in COMMANDS.items():
        if full is None or name in full:
            importlib.import_module(f"pretrace.cli.{name}").register(subparsers)
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)  # the sub-command, if one is named
    args = build_parser([command] if command in COMMANDS else []).parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except PretraceError as exc:
        print(f"pretrace: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"pretrace: error: no space left on the device writing {exc.filename or 'the output'}; free space or choose another --out "
              f"and re-run{' (it resumes from its last checkpoint)' if args.command in RESUMABLE else ''}. Nothing half-written was kept.",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command in RESUMABLE:
            print("pretrace: interrupted; re-run the same command to resume.", file=sys.stderr)
        else:
            print(f"pretrace: interrupted; `pretrace {args.command}` does not resume and left no output; re-run it to start over.", file=sys.stderr)
        return 130
