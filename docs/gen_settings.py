"""MkDocs hook (mkdocs.yml `hooks:`): a table of every setting of a settings dataclass, generated at build time.

A line `<!-- settings: pretrace.curvature.fit.FitSettings -->` in a page becomes a table of that class's settings
as the Python API takes them (the flat keyword, `damping_factor=`), with the CLI flag, the default and the help,
all read from the fields' own declarations (`pretrace.config.option`), the same ones `--help` prints. Groups are
flattened as the keywords are; a method's own settings name the methods that read them.

A line `<!-- methods -->` becomes a table of the attribution methods (`pretrace.methods.config.METHODS`): each
one's name, settings class, summary, what it needs, and its own settings.
"""

from __future__ import annotations

import dataclasses
import html
import importlib
import re
import typing

MARKER = re.compile(r"^<!-- settings: ([\w.]+) -->$", re.MULTILINE)
METHODS_MARKER = "<!-- methods -->"


def _text(value: str) -> str:
    """Plain help text as HTML: escaped, with `code` spans kept as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(value, quote=False))


def _type(annotation) -> str:
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
    return str(name).replace("typing.", "").replace("NoneType", "None")


def _rows(cls: type, users: str = "") -> list[tuple[str, str, str, str, str]]:
    """(keyword, flag, type, default, help) of every flat setting of `cls`, as `pretrace.config.flat_keys` walks them."""
    from pretrace.config import default_of, flag_of, key_of, variant_fields

    hints = typing.get_type_hints(cls)
    rows = []
    for field in dataclasses.fields(cls):
        if field.metadata.get("group"):
            rows += _rows(hints[field.name])
            continue
        default = default_of(field)
        shown = "required" if default is dataclasses.MISSING else repr(default)
        help_text = field.metadata.get("help", "")
        if "variants" in field.metadata:
            choices = field.metadata["variants"]
            rows.append((key_of(field), flag_of(field), "str | a method's settings object",
                         shown, f"{help_text} One of: {', '.join(choices)}.".strip()))
            for key, (variant_field, names) in variant_fields(choices).items():
                variant_hints = typing.get_type_hints(choices[names[0]])
                note = f"With {flag_of(field)} {', '.join(names)}: "
                rows.append((key, flag_of(variant_field), _type(variant_hints[variant_field.name]),
                             repr(default_of(variant_field)), note + variant_field.metadata.get("help", "")))
            continue
        rows.append((key_of(field), flag_of(field), _type(hints[field.name]), shown, users + help_text))
    return rows


def table(path: str) -> str:
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    lines = ['<table class="pretrace-settings">',
             "<thead><tr><th>keyword</th><th>CLI flag</th><th>type</th><th>default</th><th>meaning</th></tr></thead>", "<tbody>"]
    for key, flag, kind, default, help_text in _rows(cls):
        lines.append(f"<tr><td><code>{key}</code></td><td><code>{html.escape(flag)}</code></td><td><code>{html.escape(kind)}</code></td>"
                     f"<td><code>{html.escape(default)}</code></td><td>{_text(help_text)}</td></tr>")
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)


def methods_table() -> str:
    from pretrace.config import default_of, flag_of
    from pretrace.methods.config import METHODS

    lines = ['<table class="pretrace-methods">',
             "<thead><tr><th><code>method=</code></th><th>settings class</th><th>what it computes</th><th>multi-stage</th>"
             "<th>factors</th><th>its own settings (<code>field=default</code>, CLI flag)</th></tr></thead>", "<tbody>"]
    for name, cls in METHODS.items():
        own = "<br>".join(f"<code>{field.name}={html.escape(repr(default_of(field)))}</code> (<code>{html.escape(flag_of(field))}</code>)"
                          for field in dataclasses.fields(cls))
        lines.append(f"<tr><td><code>{html.escape(name)}</code></td><td><code>{cls.__name__}</code></td><td>{_text(cls.summary)}</td>"
                     f"<td>{'yes' if cls.multi_stage else 'no'}</td><td>{'yes' if cls.factors else 'no'}</td><td>{own or '—'}</td></tr>")
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if METHODS_MARKER in markdown:
        markdown = markdown.replace(METHODS_MARKER, methods_table())
    return MARKER.sub(lambda match: table(match.group(1)), markdown)
