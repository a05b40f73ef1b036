"""Open a report in headless Chromium: the rendered DOM with its console messages, or a screenshot.

Plain command-line Chromium (`--dump-dom`, `--screenshot`), no driver or Python dependency. Chromium logs every
console message (log, warning, error, uncaught exception) as `INFO:CONSOLE`, without its level, so callers get them
all; the report has no scripts, so for it any console message is a defect.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pretrace.errors import PretraceError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_QUIET_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
)
# Two formats seen across versions: `...:INFO:CONSOLE(12)] "msg", source: URL (12)` and `...:INFO:CONSOLE:12] ...`.
_CONSOLE_LINE = re.compile(r':CONSOLE(?:\(\d+\)|:\d+)?\]\s*(.*)$')


@dataclass(frozen=True)
class PageLoad:
    dom: str                  # the document after scripts ran, serialised by Chromium
    console: list[str]        # every console message, e.g. '"Uncaught ReferenceError: f is not defined", source: ...'


def find_chromium() -> str | None:
    """`$PRETRACE_CHROMIUM` if set (None if it is not executable), else the first Chromium/Chrome on PATH, else None."""
    configured = os.environ.get("PRETRACE_CHROMIUM")
    if configured:
        return shutil.which(configured)
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


def load_page(html_path: str | Path, timeout: float = 60.0) -> PageLoad:
    """Render a local HTML file headlessly and return its DOM and console messages."""
    result = _run_chromium(html_path, ["--enable-logging=stderr", "--v=0", "--dump-dom"], timeout)
    console = [match.group(1) for line in result.stderr.splitlines() if (match := _CONSOLE_LINE.search(line))]
    return PageLoad(dom=result.stdout, console=console)


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1200, height: int = 1600,
               timeout: float = 60.0) -> Path:
    """Save a PNG of the top `width` x `height` pixels of a local HTML file (written atomically)."""
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    tmp.unlink(missing_ok=True)
    flags = [f"--screenshot={tmp.resolve()}", f"--window-size={width},{height}", "--hide-scrollbars"]
    result = _run_chromium(html_path, flags, timeout)
    if not tmp.is_file():
        raise PretraceError(f"Chromium wrote no screenshot of {html_path}; its last output:\n{_tail(result.stderr)}")
    os.replace(tmp, png_path)
    return png_path


def _run_chromium(html_path: str | Path, flags: list[str], timeout: float) -> subprocess.CompletedProcess:
    executable = find_chromium()
    if executable is None:
        configured = os.environ.get("PRETRACE_CHROMIUM")
        problem = f"PRETRACE_CHROMIUM={configured!r} is not an executable" if configured else "no Chromium on PATH"
        raise PretraceError(f"{problem}; install it (Debian: `apt-get install -y chromium`) or point PRETRACE_CHROMIUM at one.")
    html_path = Path(html_path)
    if not html_path.is_file():
        raise PretraceError(f"{html_path}: no such file; write the report first.")
    with tempfile.TemporaryDirectory(prefix="pretrace-chromium-") as profile:
        command = [executable, *_QUIET_FLAGS, f"--user-data-dir={profile}", *flags, html_path.resolve().as_uri()]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise PretraceError(f"Chromium did not finish {html_path} within {timeout:.0f}s; raise the timeout.") from None
    if result.returncode != 0:
        raise PretraceError(f"Chromium failed on {html_path} (exit {result.returncode}):\n{_tail(result.stderr)}")
    return result


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.splitlines()[-lines:])
