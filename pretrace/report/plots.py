"""PNG figures for READMEs and papers: how scores are distributed, and which layers carry the influence.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing touches global backend state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from pretrace.errors import PretraceError
from pretrace.report.results import layer_scores, load_results, ordered_layers

MAX_LABELLED_QUERIES = 10
MAX_TICK_LABELS = 40
LOG_SCALE_FROM = 100  # below this many values a log axis has too few decades to read


def plot_score_distributions(scores, path: str | Path, query_ids: Sequence[str] | None = None) -> Path:
    """Histogram of all scores plus each query's scores sorted by rank.

    `scores` is a `[Q, N]` tensor/array (e.g. from `pretrace.scores.io.load_scores`) or results rows, whose
    listed documents give each query's scores.
    """
    per_query, ids = _score_lists(scores, query_ids)
    figure = Figure(figsize=(11, 4.2), dpi=120, layout="constrained")
    pooled = np.concatenate(per_query)
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0:
        raise PretraceError("no finite scores to plot; check the score step's output for NaN/inf.")
    histogram, ranked = figure.subplots(1, 2)
    histogram.hist(pooled, bins=min(60, max(10, pooled.size // 5)), color="#4c72b0")
    histogram.axvline(0.0, color="#444", linewidth=0.8)
    if pooled.size >= LOG_SCALE_FROM:
        histogram.set_yscale("log")
    else:
        histogram.yaxis.get_major_locator().set_params(integer=True)
    histogram.set(title=f"All scores ({pooled.size} query-document pairs)", xlabel="influence score", ylabel="count")
    labelled = len(per_query) <= MAX_LABELLED_QUERIES
    for query_id, values in zip(ids, per_query):
        ordered = np.sort(values[np.isfinite(values)])[::-1]
        ranked.plot(np.arange(1, ordered.size + 1), ordered, marker="o" if ordered.size <= 30 else None,
                    markersize=3, linewidth=1.2 if labelled else 0.6, alpha=1.0 if labelled else 0.5,
                    label=_short(query_id) if labelled else None)
    ranked.axhline(0.0, color="#444", linewidth=0.8)
    longest = max(values.size for values in per_query)
    if longest >= LOG_SCALE_FROM:
        ranked.set_xscale("log")
    else:
        ranked.xaxis.get_major_locator().set_params(integer=True)
    ranked.set(title="Scores by rank, per query", xlabel="rank" + (" (log scale)" if longest >= LOG_SCALE_FROM else ""),
               ylabel="influence score")
    if labelled:
        ranked.legend(fontsize=8, loc="upper right")
    return _save(figure, path)


def plot_layer_influence(rows: str | Path | Iterable[Mapping], path: str | Path) -> Path:
    """Heatmap query x layer: module scores of each query's listed documents summed per layer, as a share of the
    query's total |contribution| (red raises the query's score, blue lowers it)."""
    rows = load_results(rows)
    totals = [_query_layer_totals(row) for row in rows]
    if not any(totals):
        raise PretraceError("no document has 'module_scores'; score with per-module output to plot layer influence.")
    keys = ordered_layers(key for total in totals for key in total)
    matrix = np.array([[total.get(key, 0.0) for key in keys] for total in totals], dtype=float)
    norms = np.abs(matrix).sum(axis=1, keepdims=True)
    matrix = np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
    limit = max(float(np.abs(matrix).max()), 1e-12)
    figure = Figure(figsize=(min(14, 3 + 0.35 * len(keys)), min(12, 1.8 + 0.32 * len(rows))), dpi=120,
                    layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -limit, limit), aspect="auto",
                        interpolation="nearest")
    _set_ticks(axes.set_xticks, range(len(keys)), [str(key) for key in keys], rotation=90)
    _set_ticks(axes.set_yticks, range(len(rows)), [_short(row["query_id"]) for row in rows])
    axes.set(xlabel="layer", ylabel="query", title="Share of influence per layer (top documents, per query)")
    figure.colorbar(image, ax=axes, label="share of |contribution|", shrink=0.9)
    return _save(figure, path)


def _score_lists(scores, query_ids: Sequence[str] | None) -> tuple[list[np.ndarray], list[str]]:
    if isinstance(scores, (str, Path)) or (isinstance(scores, (list, tuple)) and scores and isinstance(scores[0], Mapping)):
        rows = load_results(scores)
        lists = [np.array([doc["score"] for doc in row["documents"]], dtype=float) for row in rows]
        return lists, [row["query_id"] for row in rows]
    matrix = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=float)
    if matrix.ndim != 2 or matrix.size == 0:
        raise PretraceError(f"scores must be a non-empty [queries, documents] matrix, got shape {matrix.shape}.")
    ids = list(query_ids) if query_ids is not None else [f"query {index + 1}" for index in range(matrix.shape[0])]
    if len(ids) != matrix.shape[0]:
        raise PretraceError(f"{len(ids)} query_ids for {matrix.shape[0]} score rows; pass one id per row.")
    return list(matrix), ids


def _query_layer_totals(row: Mapping) -> dict:
    totals: dict = {}
    for doc in row["documents"]:
        for key, value in layer_scores(doc.get("module_scores") or {}).items():
            totals[key] = totals.get(key, 0.0) + value
    return totals


def _set_ticks(setter, positions: range, labels: list[str], rotation: int = 0) -> None:
    """Label every tick when they fit, else about MAX_TICK_LABELS evenly spaced ones."""
    step = max(1, -(-len(positions) // MAX_TICK_LABELS))
    setter(list(positions)[::step], labels[::step], rotation=rotation, fontsize=8)


def _short(text: str, limit: int = 28) -> str:
    """A label that fits, with '$' escaped so matplotlib does not read the id as mathtext."""
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    FigureCanvasAgg(figure)
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
