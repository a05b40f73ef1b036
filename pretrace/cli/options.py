"""Turn a settings dataclass into argparse flags and back, so CLI, API, pipeline files and saved JSON share one
definition (`pretrace.config`).

Every field is one flag whose destination is its flat key (`pretrace.config.key_of`: a pipeline file's key too). A
nested group becomes an argument group; a `variants` field (`--method`) becomes a choice plus one argument group per
set of variants sharing flags. Parsing back is `pretrace.config.from_flags` over the parsed values, which builds the
chosen variant and refuses any other variant's flag that was set.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from typing import Any, TypeVar

from pretrace.config import default_of, flag_of, flat_keys, from_flags, key_of, variant_fields

T = TypeVar("T")

# argparse takes "-1e-3", "-inf" and "-nan" for options unless told they are numbers
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


# Python 3.10's BooleanOptionalAction appends "(default: ...)" to the help itself, later versions do not: shown once either way
_ARGPARSE_SHOWS_BOOL_DEFAULTS = argparse.BooleanOptionalAction(["--probe"], "probe", default=False, help="").help != ""


def _scalar(annotation) -> type:
    """The scalar type of `int`, `float | None`, `str`, ..."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _number_or_word(value: str) -> int | str:
    """An `int | str` flag's value: a number when it reads as one, else the word ('auto')."""
    try:
        return int(value)
    except ValueError:
        return value


def _add_flag(container, field: dataclasses.Field, annotation) -> None:
    scalar, default = _scalar(annotation), default_of(field)
    required = default is dataclasses.MISSING or field.metadata.get("required_flag", False)
    help_text = field.metadata.get("help", "")
    if not required and default is not None and scalar is not bool:
        help_text += f" (default: {default})"
    elif scalar is bool and default is not None and not _ARGPARSE_SHOWS_BOOL_DEFAULTS:
        help_text += f" (default: {flag_of(field) if default else '--no-' + flag_of(field)[2:]})"
    kwargs: dict[str, Any] = {"dest": key_of(field), "help": help_text, "default": None if required else default}
    if scalar is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = _number_or_word if set(typing.get_args(annotation)) >= {int, str} else scalar if scalar in (int, float) else str
        kwargs["required"] = required
        if field.metadata.get("choices"):
            kwargs["choices"] = field.metadata["choices"]
        else:
            kwargs["metavar"] = key_of(field).upper()
    container.add_argument(flag_of(field), **kwargs)


def add_arguments(parser: argparse.ArgumentParser, cls: type, container=None, title: str | None = None) -> None:
    """The flags of `cls` (and of its groups and variants) on `parser`; `container`: the argument group to use, or
    `title`: a new group of that name (so `--help` reads in sections rather than one list)."""
    parser._negative_number_matcher = NEGATIVE_NUMBER  # argparse's own hook; its default misses scientific notation
    container = container or (parser.add_argument_group(title) if title else parser)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.metadata.get("group"):
            nested = hints[field.name]
            add_arguments(parser, nested, parser.add_argument_group(nested.__name__.lower(), (nested.__doc__ or "").strip() or None))
        elif "variants" in field.metadata:
            _add_variants(parser, container, field)
        else:
            _add_flag(container, field, hints[field.name])


def _add_variants(parser: argparse.ArgumentParser, container, field: dataclasses.Field) -> None:
    choices = field.metadata["variants"]
    summaries = "; ".join(f"{name}: {variant.summary}" for name, variant in choices.items() if getattr(variant, "summary", ""))
    container.add_argument(flag_of(field), dest=key_of(field), choices=tuple(choices), default=field.default,
                           help=f"{field.metadata.get('help', '')} {summaries} (default: {field.default})")
    groups: dict[str, Any] = {}
    for key, (variant_field, users) in variant_fields(choices).items():
        title = f"{flag_of(field)} {', '.join(users)}"
        group = groups.setdefault(title, parser.add_argument_group(title))
        _add_flag(group, variant_field, typing.get_type_hints(choices[users[0]])[variant_field.name])


def from_arguments(cls: type[T], args: argparse.Namespace) -> T:
    """The settings object the parsed `args` describe (see `pretrace.config.from_flags`)."""
    keys = flat_keys(cls)
    return from_flags(cls, {key: value for key, value in vars(args).items() if key in keys})
