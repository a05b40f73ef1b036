"""`pretrace` command line: one module per sub-command, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
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
RESUMABLE = {"fit", "score", "index", "trace", "run", "demo", "bench"}  # they checkpoint or cache their work beside or in --out
DEBUG_ENV = "PRETRACE_TRACEBACK"  # set to 1 to see the traceback of an internal error


def build_parser(full: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the commands in `full` (all when None) get their flags, the others just their summary."""
    parser = argparse.ArgumentParser(
        prog="pretrace",
        description="Influence functions for causal LMs: which training documents made the model say that?",
    )
    from pretrace.version import __version__

    parser.add_argument("--version", action="version", version=f"pretrace {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in COMMANDS.items():
        if full is None or name in full:
            importlib.import_module(f"pretrace.cli.{name}").register(subparsers)
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure a user can cause exits 2 with the problem and the fix, never a traceback."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)  # the sub-command, if one is named
    args = build_parser([command] if command in COMMANDS else []).parse_args(argv)
    try:
        _quiet_other_ranks()
        return int(args.handler(args) or 0)
    except PretraceError as exc:
        return _refuse(str(exc))
    except OSError as exc:
        return _refuse(_os_error(exc, args.command))
    except KeyboardInterrupt:
        if args.command in RESUMABLE:
            print("pretrace: interrupted; re-run the same command to resume where it stopped (nothing half-written was kept).", file=sys.stderr)
        else:
            print(f"pretrace: interrupted; `pretrace {args.command}` does not resume and left no output; re-run it to start over.", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of pretrace's own: said as such, with how to see and report it
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"pretrace: internal error ({type(exc).__name__}: {str(exc)[:300]}); this is a bug in pretrace, not in your input. "
              f"Re-run with {DEBUG_ENV}=1 for the traceback and report it.", file=sys.stderr)
        return 1


def _quiet_other_ranks() -> None:
    """Under torchrun only rank 0 speaks: the other processes of this command print nothing and warn nothing (the CLI
    owns its process; the library never changes a process's streams or warning filters)."""
    from pretrace.parallel import group

    if group.requested_world_size() <= 1:
        return
    group.initialize()
    if not group.is_main():
        import warnings

        from transformers.utils import logging as transformers_logging

        sys.stdout = open(os.devnull, "w")
        warnings.simplefilter("ignore")
        transformers_logging.disable_progress_bar()


def _refuse(message: str) -> int:
    print(f"pretrace: error: {message}", file=sys.stderr)
    return 2


def _os_error(exc: OSError, command: str) -> str:
    """A failure of the file system, named with its file and what to do: a full disk, a read-only or unwritable place."""
    where = exc.filename or "the output"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        resume = " (it resumes from its last checkpoint)" if command in RESUMABLE else ""
        return f"no space left on the device writing {where}; free space or choose another --out and re-run{resume}. Nothing half-written was kept."
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {where} ({exc.strerror}); choose a writable --out."
    return f"{where}: {exc.strerror or exc}; check the path and re-run."
