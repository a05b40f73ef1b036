"""Human-facing output of a trace: a self-contained HTML report, PNG plots, and headless-browser helpers."""

from pretrace.report.browser import find_chromium, load_page, screenshot
from pretrace.report.html import write_report
from pretrace.report.plots import plot_layer_influence, plot_score_distributions
from pretrace.report.results import layer_of, layer_scores, load_results

__all__ = [
    "find_chromium",
    "layer_of",
    "layer_scores",
    "load_page",
    "load_results",
    "plot_layer_influence",
    "plot_score_distributions",
    "screenshot",
    "write_report",
]
