"""MkDocs hook (mkdocs.yml `hooks:`): the CLI reference page, generated at build time from pretrace's own parsers.

`docs/cli.md` holds the page's prose and one marker line, `<!-- cli-reference -->`. When MkDocs reads that page,
the marker is replaced by a section per command: `pretrace.cli.build_parser()` builds every sub-command's parser
(the same parsers `pretrace COMMAND --help` prints) and each parser's `format_help()` is rendered as it is, so the
reference cannot drift from the code. Nested sub-commands (`pretrace bench BENCHMARK`) get a section each.
"""

from __future__ import annotations

import argparse

MARKER = "<!-- cli-reference -->"
PAGE = "cli.md"
# argparse wraps help to $COLUMNS (fixed, so the page is the same on every machine) and, from Python 3.14, may colour
# it on a terminal (NO_COLOR turns that off)
HELP_ENVIRONMENT = {"COLUMNS": "100", "NO_COLOR": "1"}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-parsers of `parser`, in the order they were registered."""
    for action in parser._actions:  # argparse keeps sub-commands only in this private list
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _sections(parser: argparse.ArgumentParser, path: list[str], level: int) -> list[str]:
    name = " ".join(path)
    lines = [f"{'#' * level} `{name}`", "", "```text", parser.format_help().rstrip(), "```", ""]
    for child_name, child in _subcommands(parser).items():
        lines += _sections(child, [*path, child_name], level + 1)
    return lines


def render() -> str:
    """The generated part of the page: `pretrace --help`, then every command's help."""
    from pretrace.cli import build_parser, environment

    with environment(HELP_ENVIRONMENT):
        parser = build_parser()  # None: every command with its full set of flags
        lines = ["## `pretrace`", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, command in _subcommands(parser).items():
            lines += _sections(command, ["pretrace", name], 2)
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/{PAGE} lost its {MARKER} line: the hook docs/gen_cli.py has nowhere to put the CLI reference")
    return markdown.replace(MARKER, render())
