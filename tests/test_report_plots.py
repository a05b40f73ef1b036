"""PNG plots: they are written (atomically) as real images, from a score matrix or from results rows."""

from __future__ import annotations

import struct

import pytest
import torch

from pretrace.errors import PretraceError
from pretrace.report import plot_layer_influence, plot_score_distributions
from test_report_html import fake_rows


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_score_distributions_from_matrix_and_rows(tmp_path):
    scores = torch.randn(4, 500, generator=torch.Generator().manual_seed(0)) ** 3
    from_matrix = plot_score_distributions(scores, tmp_path / "matrix.png", query_ids=list("abcd"))
    from_rows = plot_score_distributions(fake_rows(), tmp_path / "rows.png")
    for path in (from_matrix, from_rows):
        width, height = png_size(path)
        assert width > 800 and height > 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["matrix.png", "rows.png"]


def test_score_distributions_reject_bad_input(tmp_path):
    with pytest.raises(PretraceError, match=r"\[queries, documents\] matrix"):
        plot_score_distributions(torch.zeros(5), tmp_path / "x.png")
    with pytest.raises(PretraceError, match="one id per row"):
        plot_score_distributions(torch.zeros(2, 3), tmp_path / "x.png", query_ids=["only-one"])
    with pytest.raises(PretraceError, match="no finite scores"):
        plot_score_distributions(torch.full((2, 3), float("nan")), tmp_path / "x.png")


def test_layer_influence_heatmap(tmp_path, monkeypatch):
    """A '$' in a query id is drawn as itself: its tick label is as wide as the same text drawn with math parsing off."""
    from pretrace.report import plots

    rows = fake_rows()
    rows[0]["query_id"] = "costs $5 and $6"  # would be mathtext if not escaped
    figures, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure) or save(figure, path))
    width, height = png_size(plot_layer_influence(rows, tmp_path / "layers.png"))
    assert width > 300 and height > 150
    figure = figures[0]
    renderer = figure.canvas.get_renderer()
    label = next(t for t in figure.axes[0].get_yticklabels() if "costs" in t.get_text())
    literal = figure.text(0, 0, "costs $5 and $6", fontsize=label.get_fontsize(), parse_math=False)
    assert label.get_window_extent(renderer).width == pytest.approx(literal.get_window_extent(renderer).width, rel=1e-6)


def test_layer_influence_needs_module_scores(tmp_path):
    rows = [{"query_id": "q", "prompt": "p", "completion": "c",
             "documents": [{"id": "d", "text": "t", "score": 1.0, "rank": 1}]}]
    with pytest.raises(PretraceError, match="module_scores"):
        plot_layer_influence(rows, tmp_path / "layers.png")
