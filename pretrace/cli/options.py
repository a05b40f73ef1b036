"""Turn a settings dataclass into argparse flags and back, so CLI, API and saved JSON share one definition."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _base_type(annotation) -> tuple[type, bool]:
    """(scalar type, optional?) for annotations like `int`, `float | None`, `str`."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing}, {})  # annotations are simple builtins here
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        scalar, _optional = _base_type(hints[field.name])
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = None if required else (field.default if field.default is not dataclasses.MISSING else field.default_factory())
        help_text = field.metadata.get("help", "")
        if not required and default is not None and scalar is not bool:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": field.name, "help": help_text}
        if scalar is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = default
        else:
            kwargs["type"] = scalar if scalar in (int, float) else str
            kwargs["required"] = required
            kwargs["default"] = default
            if field.metadata.get("choices"):
                kwargs["choices"] = field.metadata["choices"]
            kwargs["metavar"] = field.name.upper() if not field.metadata.get("choices") else None
            if kwargs["metavar"] is None:
                kwargs.pop("metavar")
        parser.add_argument(_flag(field), **kwargs)


def from_arguments(cls: type[T], args: argparse.Namespace) -> T:
    return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})
