"""`pretrace` command line: one module per sub-command, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from contextlib import contextmanager, redirect_stdout
from typing import Iterable, Iterator

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
DISABLE_PROGRESS_ENV = "TQDM_DISABLE"  # read by pretrace.progress (importing it here would import tqdm for --help)
QUIET_LIBRARIES = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}  # unless --verbose


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
            add_output_options(subparsers.choices[name])
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """What every command shows on the terminal, the same flags everywhere."""
    group = next((g for g in parser._action_groups if g.title == "terminal output"), None) or parser.add_argument_group("terminal output")
    loudness = group.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="Print only warnings and errors: no progress bars, no summaries (results are still written).")
    loudness.add_argument("-v", "--verbose", action="store_true", help="Also show the libraries' own loading bars and informational messages (transformers, Hugging Face hub).")
    group.add_argument("--no-progress", action="store_true", help="No progress bars (as TQDM_DISABLE=1); off a terminal they are already plain lines every 30 s.")


@contextmanager
def output_options(args: argparse.Namespace) -> Iterator[None]:
    """For the command's run, through the variables each library reads (set before they are imported): the CLI owns
    its process, while the library never changes a process's streams. A user's own setting of them wins over these
    defaults, and everything is restored afterwards (main may be called in-process)."""
    quiet = getattr(args, "quiet", False)
    settings = {}
    if quiet or getattr(args, "no_progress", False):
        settings[DISABLE_PROGRESS_ENV] = "1"
    if not getattr(args, "verbose", False):  # a local model's weight-loading bar and the hub's notes are noise here
        settings.update({name: os.environ.get(name, value) for name, value in QUIET_LIBRARIES.items()})
    with environment(settings):
        if quiet and args.command != "inspect":  # inspect's output is what was asked for
            with open(os.devnull, "w") as sink, redirect_stdout(sink):
                yield
        else:
            yield


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """These environment variables set for the block and restored after it."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure a user can cause exits 2 with the problem and the fix, never a traceback."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)  # the sub-command, if one is named
    args = build_parser([command] if command in COMMANDS else []).parse_args(argv)
    try:
        _quiet_other_ranks()
        with output_options(args):
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
        missing = _missing_extra(exc)
        if missing:
            return _refuse(missing)
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"pretrace: internal error ({type(exc).__name__}: {str(exc)[:300]}); this is a bug in pretrace, not in your input. "
              f"Re-run with {DEBUG_ENV}=1 for the traceback and report it.", file=sys.stderr)
        return 1


def _missing_extra(exc: Exception) -> str | None:
    """An optional dependency a command imported without the check that would have named it: the extra to install."""
    from pretrace.extras import EXTRA_OF, install_line

    module = (getattr(exc, "name", None) or "").split(".")[0] if isinstance(exc, ModuleNotFoundError) else ""
    if module not in EXTRA_OF:
        return None
    return f"{module} is not installed here, and this command needs it: {install_line([module])}."


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
