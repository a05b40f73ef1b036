"""Progress bars that follow the terminal's conventions, one place for every loop of pretrace.

* `TQDM_DISABLE` (set by `-q` and `--no-progress`, or by the user) turns every bar off: tqdm reads it only for
  arguments not passed, and the loops pass `disable`, so it is honoured here.
* When stderr is no terminal (a log file, CI, a pipe), a bar becomes one plain line every `PLAIN_INTERVAL`
  seconds instead of carriage-return redraws, which fill a log with thousands of overwritten states.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm.auto import tqdm

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


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **options: Any) -> tqdm:
    """`tqdm(iterable, **options)`, off unless `enabled` and the process allows bars; plain lines off a terminal."""
    stream = sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        options.setdefault("file", PlainLines(stream))
        options.setdefault("mininterval", PLAIN_INTERVAL)
        options.setdefault("ascii", True)
    return tqdm(iterable, disable=not enabled or progress_disabled(), **options)
