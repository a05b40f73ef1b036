"""Typed settings that are at once the Python API, the CLI flags and the JSON recorded beside results.

A settings class is a dataclass of `option` fields. Each field carries its help, its allowed values (`choices`,
numeric bounds) and its flag, and `validate` checks a whole object in one place: a value of the wrong type is a
`TypeError` naming the setting (the Python API's callers), one out of range or not among the choices a
`PretraceError` naming the flag (exit 2 on the CLI). A field holding another settings class (`nested`) is a group of
flags on the CLI and a nested object in Python and in JSON; a field holding a `Variant` (`variants`) is chosen by
name (`--method trak`) and brings the chosen variant's own flags. `pretrace.cli.options` turns a class into argparse
flags and back; `to_dict` is what gets written to disk.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, ClassVar

from pretrace.errors import PretraceError

BOUNDS = ("above", "at_least", "at_most", "below")
# what a path setting records when the Python API was handed the object itself (a loaded model, records, factors)
IN_MEMORY = "<in memory>"


def option(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None, flag: str | None = None,
           required_flag: bool = False, **kwargs):
    """A dataclass field with CLI help; `flag` overrides the derived --flag-name; `above`, `at_least`, `at_most` and
    `below` bound a number (checked by `validate`, NaN and infinities refused); `required_flag`: required on the CLI
    and in pipeline files though optional in Python (an output folder the Python API may do without)."""
    metadata = {"help": help, "choices": choices, "flag": flag, "required_flag": required_flag,
                **{bound: kwargs.pop(bound) for bound in BOUNDS if bound in kwargs}}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def nested(cls: type, help: str = ""):
    """A nested settings object (its flags form one group on the CLI), by default the class's defaults."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "group": True})


def variants(choices: dict[str, type], default: str, help: str = ""):
    """A `Variant` chosen by name: a name (str) or a variant object in Python, `--FLAG NAME` plus the variant's own
    flags on the CLI, `{"name": ..., **settings}` in JSON. `validate` turns a name into the variant's defaults."""
    return dataclasses.field(default=default, metadata={"help": help, "variants": choices, "choices": tuple(choices)})


class Variant:
    """Base of the settings classes a `variants` field chooses between (each names itself in `name`)."""

    name: ClassVar[str] = ""


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def key_of(field: dataclasses.Field) -> str:
    """The setting's flat name: its flag without '--', '_' for '-' (a pipeline file's key, argparse's destination)."""
    return flag_of(field)[2:].replace("-", "_")


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def variant_fields(choices: dict[str, type]) -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Each key of the variants' settings: its field and the names of the variants that read it (a key several share
    is listed once)."""
    keys: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for name, variant in choices.items():
        for field in dataclasses.fields(variant):
            keys.setdefault(key_of(field), (field, []))[1].append(name)
    return keys


def flat_keys(cls: type) -> dict[str, dataclasses.Field]:
    """Every flat key of `cls` (its groups' and variants' too) and its field."""
    hints = typing.get_type_hints(cls)
    keys = {}
    for field in dataclasses.fields(cls):
        if field.metadata.get("group"):
            keys.update(flat_keys(hints[field.name]))
        elif "variants" in field.metadata:
            keys[key_of(field)] = field
            keys.update({key: variant for key, (variant, _) in variant_fields(field.metadata["variants"]).items()})
        else:
            keys[key_of(field)] = field
    return keys


def from_flags(cls: type, values: dict[str, Any] | None = None, **flags: Any):
    """A settings object from flat keys (`top_k=5`, `lissa_depth=3`, as on the CLI and in pipeline files), every other
    key at its default. An unknown key is a `TypeError`; a key of a variant other than the chosen one, set to anything
    but its default, is refused (it would have no effect)."""
    given = {**(values or {}), **flags}
    known = flat_keys(cls)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TypeError(f"{cls.__name__} has no setting {', '.join(map(repr, unknown))}; its settings are {', '.join(sorted(known))}.")
    return _build(cls, given)


def _build(cls: type, given: dict[str, Any]):
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        key = key_of(field)
        if field.metadata.get("group"):
            values[field.name] = _build(hints[field.name], given)
        elif "variants" in field.metadata:
            values[field.name] = _chosen(field, given.get(key, field.default), given)
        elif key in given:
            values[field.name] = given[key]
    return cls(**values)


def _chosen(field: dataclasses.Field, method: Any, given: dict[str, Any]):
    """The variant `method` names (or is), with its own settings from `given`; another variant's setting is refused."""
    choices = field.metadata["variants"]
    if not isinstance(method, str):
        return method  # an object: `validate` checks its type, and its settings are its own
    if method not in choices:
        raise PretraceError(f"{flag_of(field)} {method!r} is not one of {list(choices)}.")
    chosen = choices[method]
    own = {key_of(f) for f in dataclasses.fields(chosen)}
    ignored = [(key, users) for key, (other, users) in variant_fields(choices).items()
               if key not in own and key in given and given[key] != default_of(other)]
    if ignored:
        flags = ", ".join("--" + key.replace("_", "-") for key, _ in ignored)
        readers = sorted({user for _, users in ignored for user in users})
        raise PretraceError(f"{flags} {'has' if len(ignored) == 1 else 'have'} no effect with {flag_of(field)} {method} "
                            f"(read by {flag_of(field)} {', '.join(readers)}); drop {'it' if len(ignored) == 1 else 'them'}, or choose that method.")
    return chosen(**{f.name: given[key_of(f)] for f in dataclasses.fields(chosen) if key_of(f) in given})


MAX_SEED = 2**32 - 1  # what every random generator pretrace seeds (torch, numpy, Python's) accepts, with room for offsets
LARGEST_INTEGER = 2**53  # the largest integer every JSON reader keeps exactly; no count or seed needs more


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _accepts(annotation, value) -> bool:
    """Whether `value` fits a simple annotation: bool, int, float (ints too), str (paths too), a class, `X | None`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, (str, os.PathLike))
    if origin is not None or annotation is Any:
        return True  # containers (lists of records, ...) are checked by the code that reads them
    return isinstance(value, annotation)


def _describe(annotation) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def validate(config, flags: bool = True) -> None:
    """Check every field of `config` (and of its groups and variant) against its type, choices and bounds; a path
    given as a `Path` is stored as its string. Types raise `TypeError` naming the setting; values `PretraceError`
    naming the flag (`flags=False`: the setting's Python name, for classes that are not command lines)."""
    hints = _hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        name = flag_of(field) if flags else field.name
        if "variants" in field.metadata:
            value = _variant(field, value)
            object.__setattr__(config, field.name, value)
            validate(value, flags)
            continue
        if not _accepts(hints[field.name], value):
            raise TypeError(f"{type(config).__name__}.{field.name} must be {_describe(hints[field.name])}, got {type(value).__name__} {value!r}.")
        if isinstance(value, os.PathLike):
            object.__setattr__(config, field.name, os.fspath(value))
        if field.metadata.get("group"):
            validate(value, flags)
        choices = field.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise PretraceError(f"{name} {value!r} is not one of {list(choices)}.")
        bounds = {bound: field.metadata[bound] for bound in BOUNDS if field.metadata.get(bound) is not None}
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > LARGEST_INTEGER:
            raise PretraceError(f"{name} {value} is larger than any count, size or seed needs; pass a value of at most 2**53.")
        if bounds and value is not None and not isinstance(value, str):  # a word an `int | str` setting allows ("auto")
            require_number(name, value, integer=hints[field.name] in (int, int | None), **bounds)


def _variant(field: dataclasses.Field, value):
    options = field.metadata["variants"]
    if isinstance(value, str):
        if value not in options:
            raise PretraceError(f"{flag_of(field)} {value!r} is not one of {list(options)}.")
        return options[value]()
    if not isinstance(value, tuple(options.values())):
        raise TypeError(f"{field.name} must be one of the names {list(options)} or a {'/'.join(c.__name__ for c in options.values())} "
                        f"object, got {type(value).__name__} {value!r}.")
    return value


def require_instance(name: str, value: Any, cls: type | tuple[type, ...]) -> Any:
    """A public entry point's argument, refused with a `TypeError` naming it unless it is a `cls`; returns it."""
    if not isinstance(value, cls):
        expected = " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
        raise TypeError(f"{name} must be a {expected}, got {type(value).__name__} {value!r:.80}.")
    return value


def require_path(name: str, value: Any) -> str:
    """A public entry point's path argument (a str or a `Path`), refused with a `TypeError` naming it otherwise."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or pathlib.Path), got {type(value).__name__} {value!r:.80}.")
    return os.fspath(value)


def to_dict(config) -> dict:
    """Plain JSON of a settings object: groups nested, a variant as `{"name": ..., **its settings}`, paths as strings."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, Variant):
            value = {"name": value.name, **to_dict(value)}
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = to_dict(value)
        elif hasattr(value, "__fspath__"):
            value = os.fspath(value)
        out[field.name] = value
    return out


def to_flags(config) -> dict[str, Any]:
    """A settings object as flat keys (`from_flags`'s inverse): groups flattened, a variant as its name and its keys."""
    flags = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, Variant):
            flags[key_of(field)] = value.name
            flags.update(to_flags(value))
        elif field.metadata.get("group"):
            flags.update(to_flags(value))
        else:
            flags[key_of(field)] = value
    return flags


def with_flags(config, **flags: Any):
    """A copy of a settings object with some flat keys changed (`dataclasses.replace` through groups and variants)."""
    return from_flags(type(config), {**to_flags(config), **flags})


def changed(config) -> list[str]:
    """The flags of the fields of `config` whose values differ from their defaults (what a user set)."""
    return [flag_of(field) for field in dataclasses.fields(config)
            if default_of(field) is dataclasses.MISSING or getattr(config, field.name) != default_of(field)]


def require_number(flag: str, value: float | None, above: float | None = None, at_least: float | None = None,
                   at_most: float | None = None, below: float | None = None, integer: bool = False) -> None:
    """Refuse NaN, infinities and out-of-range values of a numeric option (None: not set) before any work: a NaN
    damping or α would otherwise run to the end and write NaN or all-zero scores."""
    if value is None:
        return
    inside = math.isfinite(value) and (above is None or value > above) and (at_least is None or value >= at_least) \
        and (at_most is None or value <= at_most) and (below is None or value < below)
    if inside:
        return
    if integer:
        words = [f"at least {at_least}" if at_least is not None else "", f"at most {at_most}" if at_most is not None else "",
                 f"above {above}" if above is not None else "", f"below {below}" if below is not None else ""]
        raise PretraceError(f"{flag} must be {' and '.join(w for w in words if w)}, got {value}.")
    bounds = [f"> {above:g}" if above is not None else "", f">= {at_least:g}" if at_least is not None else "",
              f"<= {at_most:g}" if at_most is not None else "", f"< {below:g}" if below is not None else ""]
    condition = " and ".join(b for b in bounds if b)
    raise PretraceError(f"{flag} must be a finite number{' ' + condition if condition else ''}, got {value}.")


def positive_numbers(flag: str, text: str, example: str) -> list[float]:
    """A comma-separated option of distinct, finite, positive numbers (e.g. the proximity strengths α, which
    multi-stage influence divides by), told apart by their 6 significant digits, as their labels are."""
    try:
        values = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise PretraceError(f"{flag} {text!r}: pass comma-separated numbers, e.g. {example}.") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values) or len({f"{v:g}" for v in values}) != len(values):
        raise PretraceError(f"{flag} {text!r}: pass one or more distinct, finite, positive numbers (told apart by their 6 significant "
                            f"digits), e.g. {example}.")
    return values
