"""PNG figures, embedded in report.html and written beside it: how scores are distributed, and which layers carry the
influence. Each figure is also available as PNG bytes, so the report stays one self-contained file.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing touches global backend state.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pretrace.errors import PretraceError
from pretrace.report.results import layer_scores, load_results, ordered_layers

MAX_LABELLED_QUERIES = 10
MAX_TICK_LABELS = 40
LOG_SCALE_FROM = 100  # below this many values a log axis has too few decades to read
MIN_LAYER_FIGURE_WIDTH = 6.0  # inches: room for the title and colour bar when there are few layers


def plot_score_distributions(scores, path: str | Path, query_ids: Sequence[str] | None = None) -> Path:
    """Histogram of all scores plus each query's scores sorted by rank, as a PNG file (see `score_distributions_png`)."""
    return write_png(score_distributions_png(scores, query_ids), path)


def plot_layer_influence(rows: str | Path | Iterable[Mapping], path: str | Path) -> Path:
    """Heatmap query x layer of each layer's share of the influence, as a PNG file (see `layer_influence_png`)."""
    return write_png(layer_influence_png(rows), path)


def score_distributions_png(scores, query_ids: Sequence[str] | None = None) -> bytes:
    """PNG bytes: histogram of all scores plus each query's scores sorted by rank (bytes, so the report can embed them).

    `scores` is a `[Q, N]` tensor/array (e.g. from `pretrace.scores.io.load_scores`) or results rows, whose
    listed documents give each query's scores.
    """
    return png_bytes(score_distributions_figure(scores, query_ids))


def layer_influence_png(rows: str | Path | Iterable[Mapping]) -> bytes:
    """PNG bytes: heatmap query x layer of each layer's share of the listed documents' |contribution|."""
    return png_bytes(layer_influence_figure(rows))


def score_distributions_figure(scores, query_ids: Sequence[str] | None = None) -> Figure:
    """The figure behind `score_distributions_png`, kept apart so its artists can be measured before rendering."""
    per_query, ids = _score_lists(scores, query_ids)
    figure = _new_figure((11, 4.2))
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
    return figure


def layer_influence_figure(rows: str | Path | Iterable[Mapping]) -> Figure:
    """Heatmap query x layer of `layer_shares`, on a sequential colour map from 0: a share is never negative."""
    rows = load_results(rows)
    keys, matrix = layer_shares(rows)
    figure = _new_figure((min(14, max(MIN_LAYER_FIGURE_WIDTH, 3 + 0.35 * len(keys))), min(12, 2.2 + 0.32 * len(rows))))
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="viridis", vmin=0.0, vmax=max(float(matrix.max()), 1e-12), aspect="auto",
                        interpolation="nearest")
    _set_ticks(axes.set_xticks, range(len(keys)), [str(key) for key in keys], rotation=90)
    _set_ticks(axes.set_yticks, range(len(rows)), [_short(row["query_id"]) for row in rows])
    axes.set(xlabel="layer", ylabel="query", title="Share of |influence| per layer\n(listed documents; each row sums to 1)")
    figure.colorbar(image, ax=axes, label="share of |contribution|", shrink=0.9)
    return figure


def layer_shares(rows: list[dict]) -> tuple[list, np.ndarray]:
    """Layer keys and a `[queries, layers]` matrix: per query, the |per-layer total| of each listed document summed
    and divided by the row's sum. Absolute per document, since the signed totals of different documents cancel (the
    sign is in the report's per-document bars)."""
    totals = [_query_layer_magnitudes(row) for row in rows]
    if not any(totals):
        raise PretraceError("no document has 'module_scores'; score with per-module output to plot layer influence.")
    keys = ordered_layers(key for total in totals for key in total)
    matrix = np.array([[total.get(key, 0.0) for key in keys] for total in totals], dtype=float)
    norms = matrix.sum(axis=1, keepdims=True)
    return keys, np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)


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


def _query_layer_magnitudes(row: Mapping) -> dict:
    totals: dict = {}
    for doc in row["documents"]:
        for key, value in layer_scores(doc.get("module_scores") or {}).items():
            totals[key] = totals.get(key, 0.0) + (abs(value) if np.isfinite(value) else 0.0)
    return totals


def _set_ticks(setter, positions: range, labels: list[str], rotation: int = 0) -> None:
    """Label every tick when they fit, else about MAX_TICK_LABELS evenly spaced ones."""
    step = max(1, -(-len(positions) // MAX_TICK_LABELS))
    setter(list(positions)[::step], labels[::step], rotation=rotation, fontsize=8)


def _short(text: str, limit: int = 28) -> str:
    """A label that fits, with '$' escaped so matplotlib does not read the id as mathtext."""
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def _new_figure(size: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas: drawable and measurable without pyplot's global state."""
    figure = Figure(figsize=size, dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG, cropped to what it draws (a long title or tick label is never cut off)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.1)
    return buffer.getvalue()


def write_png(data: bytes, path: str | Path) -> Path:
    """Write PNG bytes atomically (a temporary sibling, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
