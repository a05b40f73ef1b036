"""Typed settings that are at once the Python API, the CLI flags and the JSON recorded beside results.

Each field carries its help text in `metadata["help"]`; `pretrace.cli.options` turns a dataclass into
argparse flags, and `asdict` is what gets written to disk.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from pretrace.errors import PretraceError


def option(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None, flag: str | None = None, **kwargs):
    """A dataclass field with CLI help; `flag` overrides the derived --flag-name."""
    metadata = {"help": help, "choices": choices, "flag": flag}
    if default is dataclasses.MISSING and "default_factory" not in kwargs:
        return dataclasses.field(metadata=metadata, **kwargs)
    if "default_factory" in kwargs:
        return dataclasses.field(metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def validate_choices(config) -> None:
    for field in dataclasses.fields(config):
        choices = field.metadata.get("choices")
        value = getattr(config, field.name)
        if choices and value is not None and value not in choices:
            raise PretraceError(f"{field.name}={value!r} is not one of {list(choices)}.")


def to_dict(config) -> dict:
    return {k: (str(v) if hasattr(v, "__fspath__") else v) for k, v in dataclasses.asdict(config).items()}


def require_number(flag: str, value: float | None, above: float | None = None, at_least: float | None = None,
                   at_most: float | None = None) -> None:
    """Refuse NaN, infinities and out-of-range values of a numeric option (None: not set) before any work: a NaN
    damping or α would otherwise run to the end and write NaN or all-zero scores."""
    if value is None:
        return
    bounds = [f"> {above:g}" if above is not None else "", f">= {at_least:g}" if at_least is not None else "",
              f"<= {at_most:g}" if at_most is not None else ""]
    inside = math.isfinite(value) and (above is None or value > above) and (at_least is None or value >= at_least) \
        and (at_most is None or value <= at_most)
    if not inside:
        condition = " and ".join(b for b in bounds if b)
        raise PretraceError(f"{flag} must be a finite number{' ' + condition if condition else ''}, got {value}.")
