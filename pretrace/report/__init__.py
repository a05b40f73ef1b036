"""Human-facing output of a trace: a self-contained HTML report, PNG plots, and headless-browser helpers."""

from pretrace.report.browser import find_chromium, load_page, screenshot
from pretrace.report.html import write_report
from pretrace.report.plots import (
    layer_influence_png,
    plot_layer_influence,
    plot_score_distributions,
    score_distributions_png,
    write_png,
)
from pretrace.report.results import duplicate_ranks, layer_of, layer_scores, load_results

__all__ = [
    "duplicate_ranks",
    "find_chromium",
    "layer_influence_png",
    "layer_of",
    "layer_scores",
    "load_page",
    "load_results",
    "plot_layer_influence",
    "plot_score_distributions",
    "score_distributions_png",
    "screenshot",
    "write_png",
    "write_report",
]
