"""Progress bars that follow the terminal's conventions, one place for every loop of pretrace.

* `TQDM_DISABLE` (set by `-q` and `--no-progress`, or by the user) turns every bar off: tqdm reads it only for
  arguments not passed, and the loops pass `disable`, so it is honoured here.
* When stderr is no terminal (a log file, CI, a pipe), a bar becomes one plain line at most every `PLAIN_INTERVAL`
  seconds instead of carriage-return redraws, which fill a log with thousands of overwritten states.
* In a notebook, tqdm's own widget.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm.auto import tqdm
from tqdm.std import tqdm as terminal_tqdm

PLAIN_INTERVAL = 30.0  # seconds between plain progress lines when stderr is no terminal
DISABLE_ENV = "TQDM_DISABLE"


def progress_disabled() -> bool:
    """Whether the process asked for no progress bars (`TQDM_DISABLE` set to anything but empty/0/false/no)."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class PlainLines:
    """A stream for tqdm where each refresh is one line: tqdm writes `\\r` + state, so the state alone is kept."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class PlainProgress(terminal_tqdm):
    """A bar off a terminal: one line per refresh, at most one every `mininterval` seconds however often a loop asks
    (`set_postfix` asks for a refresh on every call); the final state is always written when the bar closes."""

    def refresh(self, nolock: bool = False, lock_args: Any = None) -> None:
        if self.disable:  # a disabled bar never set its interval
            return
        now = time.monotonic()
        if now - getattr(self, "_plain_last", -math.inf) >= self.mininterval:
            self._plain_last = now
            super().refresh(nolock=nolock, lock_args=lock_args)


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **options: Any) -> tqdm:
    """`tqdm(iterable, **options)`, off unless `enabled` and the process allows bars; plain lines off a terminal."""
    disable = not enabled or progress_disabled()
    notebook = type(sys.stderr).__module__.startswith("ipykernel")  # its stderr is no terminal, but shows widgets
    if notebook or getattr(sys.stderr, "isatty", lambda: False)():
        return tqdm(iterable, disable=disable, **options)
    options.setdefault("file", PlainLines(sys.stderr))
    options.setdefault("mininterval", PLAIN_INTERVAL)
    options.setdefault("ascii", True)
    return PlainProgress(iterable, disable=disable, **options)


def note(message: str) -> None:
    """An informational line on stderr (a memory plan, a measured peak), silenced with the bars (`-q`, TQDM_DISABLE)."""
    if not progress_disabled():
        print(message, file=sys.stderr, flush=True)
