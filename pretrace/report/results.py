"""The `results.jsonl` schema the report reads, its validation, and per-layer aggregation of module scores.

One JSON object per line, one line per query::

    {"query_id": str, "prompt": str, "completion": str, "measured_completion": str | null,
     "documents": [{"id": str, "text": str, "score": float, "rank": int (1-based),
                    "retrieval_rank": int | null,
                    "tokens": [str, ...], "token_scores": [float, ...],   # per-token contributions, sum = score
                    "module_scores": {"<module name>": float, ...}}]}      # per-module contributions, sum = score

`measured_completion`, `retrieval_rank`, `tokens`/`token_scores` and `module_scores` may be absent (e.g. for a
retrieval baseline that has no gradients); the report then shows the plain text and leaves the layer bar out.
Module names are grouped by layer: the first purely numeric component of the dotted name is the layer index
(`model.layers.12.self_attn.q_proj` -> 12, `transformer.h.0.attn.c_attn` -> 0); a module without one
(`lm_head`) keeps its own name as its group.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping

from pretrace.data.records import iter_json_objects
from pretrace.errors import PretraceError

LayerKey = int | str


def load_results(source: str | Path | Iterable[Mapping]) -> list[dict]:
    """Validated rows from a `results.jsonl` path or from rows already in memory; documents sorted by rank."""
    if isinstance(source, (str, Path)):
        rows, where = [row for _, row in iter_json_objects(source)], str(source)
    else:
        rows, where = [dict(row) for row in source], "results"
    if not rows:
        raise PretraceError(f"{where}: no queries; run the trace/score step first so it writes one row per query.")
    return [_checked_row(row, f"{where} row {index + 1}") for index, row in enumerate(rows)]


def _require_fields(record: object, keys: tuple[str, ...], where: str, hint: str = "") -> None:
    if not isinstance(record, Mapping):
        raise PretraceError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    for key in keys:
        if key not in record:
            raise PretraceError(f"{where}: missing field '{key}' (found: {sorted(record)}){hint}.")


def _checked_row(row: Mapping, where: str) -> dict:
    _require_fields(row, ("query_id", "prompt", "completion", "documents"), where, "; see pretrace.report.results for the schema")
    if not isinstance(row["documents"], list):
        raise PretraceError(f"{where}: 'documents' must be a list, got {type(row['documents']).__name__}.")
    where = f"{where} (query {row['query_id']!r})"
    documents = [_checked_document(doc, f"{where} document {index + 1}") for index, doc in enumerate(row["documents"])]
    return {**row, "query_id": str(row["query_id"]), "documents": sorted(documents, key=lambda doc: doc["rank"])}


def _checked_document(doc: Mapping, where: str) -> dict:
    _require_fields(doc, ("id", "text", "score", "rank"), where)
    tokens, token_scores = doc.get("tokens"), doc.get("token_scores")
    if (tokens is None) != (token_scores is None):
        raise PretraceError(f"{where}: 'tokens' and 'token_scores' must be given together or not at all.")
    if tokens is not None and len(tokens) != len(token_scores):
        raise PretraceError(f"{where}: {len(tokens)} tokens but {len(token_scores)} token_scores; they must pair up one to one.")
    module_scores = doc.get("module_scores")
    if module_scores is not None and not isinstance(module_scores, Mapping):
        raise PretraceError(f"{where}: 'module_scores' must be an object mapping module name to score.")
    if not isinstance(doc["score"], (int, float)) or isinstance(doc["score"], bool):
        raise PretraceError(f"{where}: 'score' must be a number, got {doc['score']!r}.")
    if not isinstance(doc["rank"], int) or doc["rank"] < 1:
        raise PretraceError(f"{where}: 'rank' must be a 1-based integer, got {doc['rank']!r}.")
    return {**doc, "id": str(doc["id"]), "score": float(doc["score"])}


def duplicate_ranks(documents: list[Mapping]) -> list[int | None]:
    """For each document, the rank of the first earlier one with the same text (whitespace aside), else None:
    a corpus with repeated passages fills a top-k with copies, which the report marks rather than hides."""
    first: dict[str, int] = {}
    marks = []
    for doc in documents:
        key = " ".join(str(doc["text"]).split())
        marks.append(first.get(key))
        first.setdefault(key, doc["rank"])
    return marks


def layer_of(module_name: str) -> int | None:
    """The layer index in a dotted module name: its first purely numeric component, or None if it has none."""
    for part in module_name.split("."):
        if part.isdigit():
            return int(part)
    return None


def layer_scores(module_scores: Mapping[str, float]) -> dict[LayerKey, float]:
    """Module scores summed per layer; layers ascending, then layer-less modules by name in first-seen order."""
    totals: dict[LayerKey, float] = {}
    for name, value in module_scores.items():
        key = layer_of(name)
        key = name if key is None else key
        totals[key] = totals.get(key, 0.0) + float(value)
    return {key: totals[key] for key in ordered_layers(totals)}


def ordered_layers(keys: Iterable[LayerKey]) -> list[LayerKey]:
    """Distinct layer keys: numbered layers ascending, then named modules in first-seen order."""
    keys = list(dict.fromkeys(keys))
    return sorted(key for key in keys if isinstance(key, int)) + [key for key in keys if isinstance(key, str)]


def layer_label(key: LayerKey) -> str:
    return f"layer {key}" if isinstance(key, int) else key


def finite_scale(values: Iterable[float]) -> float:
    """The largest finite |value| (0.0 if none): the per-document normaliser for colours and bars."""
    return max((abs(v) for v in values if math.isfinite(v)), default=0.0)
