"""The run settings a report shows: those that shaped its numbers, rounded for reading.

A score folder records every setting, including the defaults of methods it did not run (TRAK's, LiSSA's...) and
bookkeeping (where it wrote, whether it overwrote). Listing all of them buries the result, so the report keeps the
method's own settings and the inputs, drops what is unset or belongs to another method, and rounds floats to 4
significant digits.
"""

from __future__ import annotations

import json
import math
from typing import Iterable, Mapping

HEADLINE = ("method", "multi_stage", "settings.method", "settings.method.name")  # in the one-line summary, not the table
# how and where a run worked, not what it computed
BOOKKEEPING = ("out", "overwrite", "force", "checkpoint_every", "resumed_batches", "placement", "shard", "factors_device", "shard_factors")
DAMPING_KEYS = ("damping", "damping_factor", "finetuned_damping")
SIGNIFICANT_DIGITS = 4
MAX_LIST_ITEMS = 6
MAX_VALUE_CHARS = 160


def method_name(info: Mapping) -> str | None:
    """The method a run used: `info["method"]`, or the one its `settings` name (a string or `{"name": ...}`)."""
    method = info.get("method")
    if method is None and isinstance(info.get("settings"), Mapping):
        method = info["settings"].get("method")
    if isinstance(method, Mapping):
        method = method.get("name")
    return method if isinstance(method, str) else None


def headline(info: Mapping) -> str:
    """One line for the folded settings' summary: the method and the kind of run, when the info says."""
    parts = []
    method = method_name(info)
    if method is not None:
        parts.append(f"method {method}")
    if isinstance(info.get("multi_stage"), bool):
        parts.append("multi-stage" if info["multi_stage"] else "single-stage")
    return ", ".join(parts)


def shown_settings(info: Mapping) -> list[tuple[str, str]]:
    """(dotted name, formatted value) of each setting worth reading: set, not bookkeeping, not another method's,
    and not repeating an earlier row's value under the same name (the settings and the hyperparameters as used)."""
    foreign = _foreign_keys(method_name(info))
    rows, seen = [], set()
    for path, value in _flatten(info):
        parts = path.split(".")
        if path in HEADLINE or _unset(value) or any(part in BOOKKEEPING for part in parts):
            continue
        if _setting_name(parts) in foreign:
            continue
        shown = format_value(path, value)
        if (parts[-1], shown) not in seen:
            seen.add((parts[-1], shown))
            rows.append((path, shown))
    return rows


def format_value(path: str, value: object) -> str:
    """A value as text: floats to 4 significant digits (seconds with their unit), long lists cut short."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and path.endswith("_seconds"):
        return f"{_round(value)} s"
    text = json.dumps(_round(value), default=str, ensure_ascii=False)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def _round(value: object) -> object:
    if isinstance(value, float):
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {key: _round(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        head = [_round(item) for item in value[:MAX_LIST_ITEMS]]
        return head + [f"… {len(value)} values"] if len(value) > MAX_LIST_ITEMS else head
    return value


def _flatten(info: Mapping, prefix: str = "") -> Iterable[tuple[str, object]]:
    for key, value in info.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value


def _unset(value: object) -> bool:
    """None, False and empty values: a switch left off or a default the run resolved elsewhere."""
    return value is None or value is False or (isinstance(value, (str, list, tuple, Mapping)) and not value)


def _setting_name(parts: list[str]) -> str | None:
    """The flat setting a path names (`damping_factor`, `settings.trak_epochs`), or None below that level."""
    if len(parts) == 1:
        return parts[0]
    return parts[1] if parts[0] == "settings" else None


def _foreign_keys(method: str | None) -> frozenset[str]:
    """Flat setting names the method does not read: other methods' own settings, and damping if it damps nothing."""
    from pretrace.config import variant_fields
    from pretrace.methods.config import METHODS

    if method not in METHODS:
        return frozenset()
    keys = {key for key, (_, readers) in variant_fields(METHODS).items() if method not in readers}
    return frozenset(keys | (set() if METHODS[method].damped else set(DAMPING_KEYS)))
