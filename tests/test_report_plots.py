"""PNG plots: they are written (atomically) as real images, from a score matrix or from results rows; the layer plot
shows a non-negative share on a sequential colour map, and its title fits in the image."""

from __future__ import annotations

import struct

import pytest
import torch

from pretrace.errors import PretraceError
from pretrace.report import layer_influence_png, plot_layer_influence, plot_score_distributions
from pretrace.report.plots import layer_influence_figure, layer_shares
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


def test_layer_influence_heatmap(tmp_path):
    """A '$' in a query id is drawn as itself: its tick label is as wide as the same text drawn with math parsing off."""
    rows = fake_rows()
    rows[0]["query_id"] = "costs $5 and $6"  # would be mathtext if not escaped
    width, height = png_size(plot_layer_influence(rows, tmp_path / "layers.png"))
    assert width > 300 and height > 150
    assert (tmp_path / "layers.png").read_bytes() == layer_influence_png(rows)  # what the report embeds
    figure = layer_influence_figure(rows)
    renderer = figure.canvas.get_renderer()
    label = next(t for t in figure.axes[0].get_yticklabels() if "costs" in t.get_text())
    literal = figure.text(0, 0, "costs $5 and $6", fontsize=label.get_fontsize(), parse_math=False)
    assert label.get_window_extent(renderer).width == pytest.approx(literal.get_window_extent(renderer).width, rel=1e-6)


def two_layer_rows(signs: tuple[float, float]) -> list[dict]:
    """One query, two documents over two layers whose signed layer totals cancel between the documents."""
    documents = [{"id": f"d{n}", "text": "t", "score": 1.0, "rank": n + 1,
                  "module_scores": {"model.layers.0.mlp": sign * 3.0, "model.layers.1.mlp": 1.0}}
                 for n, sign in enumerate(signs)]
    return [{"query_id": "a query with a long name", "prompt": "p", "completion": "c", "documents": documents}]


def test_layer_shares_are_non_negative_and_do_not_cancel():
    """Layer 0 carries +3 in one document and -3 in the other: three quarters of the |influence|, not zero."""
    keys, matrix = layer_shares(two_layer_rows((1.0, -1.0)))
    assert keys == [0, 1]
    assert matrix.tolist() == [pytest.approx([0.75, 0.25])]


def test_layer_plot_uses_a_sequential_map_from_zero_and_its_title_fits():
    """The quantity is never negative, so no diverging map centred on 0; with two layers (a narrow figure) the title
    stays inside the image."""
    figure = layer_influence_figure(two_layer_rows((1.0, 1.0)))
    axes = figure.axes[0]
    image = axes.get_images()[0]
    assert image.get_cmap().name == "viridis" and image.norm.vmin == 0.0
    renderer = figure.canvas.get_renderer()
    figure.draw(renderer)
    title = axes.title.get_window_extent(renderer)
    assert title.x0 >= 0 and title.x1 <= figure.bbox.width and title.y1 <= figure.bbox.height


def test_layer_influence_needs_module_scores(tmp_path):
    rows = [{"query_id": "q", "prompt": "p", "completion": "c",
             "documents": [{"id": "d", "text": "t", "score": 1.0, "rank": 1}]}]
    with pytest.raises(PretraceError, match="module_scores"):
        plot_layer_influence(rows, tmp_path / "layers.png")
