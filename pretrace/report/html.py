"""One self-contained `report.html`: the results first (every query, its answer, its top documents with words shaded by
contribution, layer bars with a scale, duplicates marked), the plots embedded, the run's settings folded to one line.

The page has no scripts and no external assets (plots are `data:` URIs), so it opens from disk, offline, anywhere.
Document text is untrusted (it comes from a pre-training corpus), so every piece of text passes through `html.escape`.
"""

from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path
from typing import Iterable, Mapping

from pretrace.report.results import duplicate_ranks, finite_scale, layer_label, layer_scores, load_results
from pretrace.report.settings import headline, shown_settings
from pretrace.report.text import Word, display_token, display_tokens, token_texts, words
from pretrace.storage import read_json

__all__ = ["display_token", "display_tokens", "format_score", "layer_bars", "shade_class", "write_report"]

POSITIVE_RGB = (214, 39, 40)   # red: the document/word/layer raises the query's score
NEGATIVE_RGB = (31, 119, 180)  # blue: it lowers it
MAX_ALPHA = 0.85               # keep the darkest shade readable under black text
SHADE_LEVELS = 10              # shades per sign; finer steps are not visible
AXIS_WIDTH = 56                # pixels left of the layer bars for their value labels
AXIS_PAD = 6                   # pixels above the bars, so the top value label is not cut off
SCORES_CAPTION = "Scores of each query's listed documents: all of them pooled (left), and by rank per query (right)."
LAYERS_CAPTION = ("Share of each query's influence per layer: every listed document's |per-layer contribution|, summed; "
                  "a row sums to 1. The per-document bars above keep the sign.")

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:16px 24px;color:#222;background:#fff}
h1{font-size:22px;margin:8px 0 12px}h2{font-size:18px;margin:28px 0 8px;border-top:2px solid #ddd;padding-top:14px}
table{border-collapse:collapse;margin:6px 0 14px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.run td:first-child{color:#555;font-family:ui-monospace,monospace}
details.settings{margin:18px 0;color:#444}details.settings summary{cursor:pointer}
.legend span{padding:1px 6px;margin-right:6px;border-radius:3px}.muted{color:#777}
.text{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px}
.prompt,.completion{padding:6px 10px;border-radius:4px;margin:4px 0}.prompt{background:#f6f6f6}.completion{background:#fff6d5}
.label{font-size:12px;color:#666;text-transform:uppercase;letter-spacing:.04em}
ol.docs{padding-left:0;list-style:none}li.doc{border:1px solid #ddd;border-radius:6px;padding:8px 12px;margin:10px 0}
li.doc.dup{border-style:dashed;background:#fafafa}
.doc-head{display:flex;flex-wrap:wrap;gap:14px;align-items:center;margin-bottom:6px}
.doc-head .id{font-weight:600}.doc-head .score{font-variant-numeric:tabular-nums}
.badge{font-size:12px;padding:1px 7px;border-radius:10px;background:#eee;color:#444;text-decoration:none}
.tokens span{border-radius:2px}.unscored{color:#888}
div.layers{display:flex;align-items:center;gap:10px;margin:2px 0 8px}.axis{font-size:12px;color:#666}
svg text{font:10px system-ui,sans-serif;fill:#555}
figure{margin:14px 0}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:13px;color:#555}
a{color:#1a55a0}
"""


def write_report(
    results: str | Path | Iterable[Mapping],
    out_path: str | Path,
    title: str = "pretrace: influential training documents",
    run_info: str | Path | Mapping | None = None,
    max_documents: int | None = None,
    figures: Mapping[str, bytes] | None = None,
) -> Path:
    """Render `results.jsonl` (a path, or its rows) into one HTML file, written atomically; returns its path.

    `run_info` (a mapping or the path of `run.json`) becomes a folded settings table of the settings that mattered;
    `max_documents` caps the documents shown per query (all of them by default). `figures` maps a caption to PNG
    bytes, embedded in the page; by default the listed documents' scores and layer shares are drawn, `{}` embeds none.
    """
    rows = load_results(results)
    info = _read_run_info(run_info)
    figures = default_figures(rows) if figures is None else figures
    page = _page(title, rows, info, max_documents, figures)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out_path)
    return out_path


def default_figures(rows: list[dict]) -> dict[str, bytes]:
    """The plots rows alone allow: their listed scores and, when documents carry module scores, the layer shares."""
    from pretrace.report.plots import layer_influence_png, score_distributions_png

    figures = {}
    if any(math.isfinite(doc["score"]) for row in rows for doc in row["documents"]):
        figures[SCORES_CAPTION] = score_distributions_png(rows)
    if any(doc.get("module_scores") for row in rows for doc in row["documents"]):
        figures[LAYERS_CAPTION] = layer_influence_png(rows)
    return figures


def _read_run_info(run_info: str | Path | Mapping | None) -> Mapping | None:
    if run_info is None or isinstance(run_info, Mapping):
        return run_info
    return read_json(run_info)


def _page(title: str, rows: list[dict], info: Mapping | None, max_documents: int | None, figures: Mapping[str, bytes]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{_CSS}{_shade_css()}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        _settings(info) if info else "",
        _summary(rows, bool(figures)),
        _legend(),
    ]
    parts.extend(_query_section(index, row, max_documents) for index, row in enumerate(rows))
    if figures:
        parts.append(_figures(figures))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def format_score(value: float) -> str:
    """A signed score to 4 significant digits (`+2255`, `-0.0312`, `+1.2e+05`)."""
    return f"{value:+.4g}" if math.isfinite(value) else str(value)


def shade_class(value: float, scale: float) -> str | None:
    """CSS class on the red(+)/blue(-) scale: `p1`..`p{SHADE_LEVELS}` or `n1`.., by |value| / scale; None if unshaded.

    Classes instead of inline colours keep a page of many thousands of words about half as large.
    """
    if not math.isfinite(value) or scale <= 0:
        return None
    level = round(SHADE_LEVELS * min(1.0, abs(value) / scale))
    if level == 0:
        return None
    return f"{'p' if value > 0 else 'n'}{level}"


def _shade_css() -> str:
    rules = []
    for level in range(1, SHADE_LEVELS + 1):
        alpha = round(MAX_ALPHA * level / SHADE_LEVELS, 3)
        for prefix, (red, green, blue) in (("p", POSITIVE_RGB), ("n", NEGATIVE_RGB)):
            rules.append(f".{prefix}{level}{{background:rgba({red},{green},{blue},{alpha})}}")
    return "".join(rules)


def _settings(info: Mapping) -> str:
    """The run's settings, folded: a reader comes for the documents, and only some come for the settings."""
    rows = shown_settings(info)
    line = headline(info)
    summary = f"Settings{': ' + line if line else ''}"
    if rows:
        summary += f" ({len(rows)} shown; unset ones and other methods' left out)"
    cells = "".join(f"<tr><td>{_esc(key)}</td><td>{_esc(value)}</td></tr>" for key, value in rows)
    return (f'<details class="settings" id="settings"><summary>{_esc(summary)}</summary>'
            f'<table class="run"><tbody>{cells}</tbody></table></details>')


def _legend() -> str:
    return (
        '<p class="legend">Words shaded by their contribution to the query\'s score, normalised per document: '
        f'<span class="p{SHADE_LEVELS}">raises it</span>'
        f'<span class="n{SHADE_LEVELS}">lowers it</span>'
        "hover a word for its value and tokens, a layer bar for its value.</p>"
    )


def _query_anchor(index: int) -> str:
    return f"q{index + 1}"


def _document_anchor(index: int, rank: int) -> str:
    return f"{_query_anchor(index)}-d{rank}"


def _summary(rows: list[dict], plots: bool) -> str:
    jump = ' <a class="muted" href="#plots">(plots below)</a>' if plots else ""
    lines = [f'<h2 id="summary">Queries{jump}</h2><table class="summary"><thead><tr>',
             "<th>#</th><th>query</th><th>prompt</th><th>answer</th><th>top document</th><th>score</th>",
             "</tr></thead><tbody>"]
    for index, row in enumerate(rows):
        top = row["documents"][0] if row["documents"] else None
        document = (f'<a href="#{_document_anchor(index, top["rank"])}">{_esc(_shorten(top["text"], 70))}</a> '
                    f'<span class="muted">{_esc(top["id"])}</span>') if top else "—"
        lines.append(
            f'<tr><td class="num">{index + 1}</td>'
            f'<td><a href="#{_query_anchor(index)}">{_esc(row["query_id"])}</a></td>'
            f'<td>{_esc(_shorten(row["prompt"]))}</td><td>{_esc(_shorten(row["completion"]))}</td>'
            f'<td>{document}</td><td class="num">{format_score(top["score"]) if top else "—"}</td></tr>'
        )
    lines.append("</tbody></table>")
    return "".join(lines)


def _shorten(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _query_section(index: int, row: dict, max_documents: int | None) -> str:
    duplicates = duplicate_ranks(row["documents"])[:max_documents]
    documents = row["documents"][:max_documents]
    parts = [
        f'<section class="query" id="{_query_anchor(index)}">',
        f'<h2>{index + 1}. {_esc(row["query_id"])} <a href="#summary" title="back to the summary">↑</a></h2>',
        f'<div class="label">prompt</div><div class="prompt text">{_esc(row["prompt"])}</div>',
        f'<div class="label">answer</div><div class="completion text">{_esc(row["completion"])}</div>',
    ]
    measured = row.get("measured_completion")
    if measured is not None and measured != row["completion"]:
        parts.append(f'<div class="label">measured completion</div><div class="completion text">{_esc(measured)}</div>')
    repeated = sum(mark is not None for mark in duplicates)
    if repeated:
        parts.append(f'<p class="muted">{repeated} of these {len(documents)} documents repeat the text of a higher-ranked '
                     "one (marked “duplicate of #k”): the corpus holds copies.</p>")
    if documents:
        items = (_document(index, doc, duplicate) for doc, duplicate in zip(documents, duplicates))
        parts.append('<ol class="docs">' + "".join(items) + "</ol>")
    else:
        parts.append("<p>No documents.</p>")
    parts.append("</section>")
    return "\n".join(parts)


def _document(index: int, doc: dict, duplicate_of: int | None) -> str:
    retrieval = doc.get("retrieval_rank")
    head = [
        f'<span class="rank">#{doc["rank"]}</span>',
        f'<span class="id">{_esc(doc["id"])}</span>',
        f'<span class="score">score {format_score(doc["score"])}</span>',
    ]
    if retrieval is not None:
        head.append(f'<span class="retrieval">retrieval rank {_esc(retrieval)}</span>')
    if duplicate_of is not None:
        head.append(f'<a class="badge dup" href="#{_document_anchor(index, duplicate_of)}" '
                    f'title="same text as the document ranked #{duplicate_of}">duplicate of #{duplicate_of}</a>')
    module_scores = doc.get("module_scores")
    bars = layer_bars(layer_scores(module_scores)) if module_scores else ""
    css_class = "doc dup" if duplicate_of is not None else "doc"
    return (
        f'<li class="{css_class}" id="{_document_anchor(index, doc["rank"])}"><div class="doc-head">{"".join(head)}</div>'
        f'{bars}<div class="tokens text">{_document_text(doc)}</div></li>'
    )


def _document_text(doc: dict) -> str:
    """The text, each word shaded by the sum of its tokens' contributions; any text past the scored tokens plain."""
    tokens = doc.get("tokens")
    if tokens is None:
        return _esc(doc["text"])
    pieces, rest = token_texts(tokens, str(doc["text"]))
    shown = words(pieces, [float(value) for value in doc["token_scores"]])
    scale = finite_scale(word.score for word in shown)
    spans = "".join(_word_span(word, scale) for word in shown)
    if rest:
        spans += f'<span class="unscored" title="not scored: past the tokens the model read">{_esc(rest)}</span>'
    return spans


def _word_span(word: Word, scale: float) -> str:
    shade = shade_class(word.score, scale)
    css_class = f' class="{shade}"' if shade else ""
    return f'{_esc(word.space)}<span{css_class} title="{_esc(_word_title(word))}">{_esc(word.text)}</span>'


def _word_title(word: Word) -> str:
    """The word's contribution and, for a word of several tokens, each token's: `+1491 from 4 tokens: ' t' +456, ...`."""
    if len(word.pieces) == 1:
        return format_score(word.score)
    pieces = ", ".join(f"{piece!r} {format_score(score)}" for piece, score in word.pieces)
    return f"{format_score(word.score)} from {len(word.pieces)} tokens: {pieces}"


def _figures(figures: Mapping[str, bytes]) -> str:
    """The plots as `data:` URIs, so the page stays one file that opens anywhere."""
    items = []
    for caption, png in figures.items():
        data = base64.b64encode(png).decode("ascii")
        items.append(f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(caption)}">'
                     f"<figcaption>{_esc(caption)}</figcaption></figure>")
    return '<section id="plots"><h2>Plots</h2>' + "".join(items) + "</section>"


def layer_bars(totals: Mapping[object, float], width: int = 360, height: int = 56) -> str:
    """Inline SVG: one bar per layer, up (red) for positive and down (blue) for negative, on an axis labelled with
    ± the document's largest |layer total| (each document has its own scale) and its first and last layer."""
    if not totals:
        return ""
    scale = finite_scale(totals.values())
    slot = width / len(totals)
    middle = height / 2
    elements = _bar_axis(scale, width, height)
    for position, (key, value) in enumerate(totals.items()):
        fraction = abs(value) / scale if scale > 0 and math.isfinite(value) else 0.0
        bar = max(fraction * (middle - 2), 0.5)
        top = middle - bar if value > 0 else middle
        colour = "rgb(%d,%d,%d)" % (POSITIVE_RGB if value > 0 else NEGATIVE_RGB)
        elements.append(
            f'<rect x="{AXIS_WIDTH + position * slot + slot * 0.1:.1f}" y="{top:.1f}" width="{slot * 0.8:.1f}" '
            f'height="{bar:.1f}" fill="{colour}"><title>{_esc(layer_label(key))}: {format_score(value)}</title></rect>'
        )
    first, last = layer_label(next(iter(totals))), layer_label(list(totals)[-1])
    elements.append(f'<text x="{AXIS_WIDTH}" y="{height + 11}">{_esc(first)}</text>')
    if len(totals) > 1:
        elements.append(f'<text x="{AXIS_WIDTH + width}" y="{height + 11}" text-anchor="end">{_esc(last)}</text>')
    total_width, total_height = AXIS_WIDTH + width, AXIS_PAD + height + 14
    return (
        f'<div class="layers"><svg width="{total_width}" height="{total_height}" viewBox="0 0 {total_width} {total_height}" '
        f'role="img" aria-label="contribution per layer"><g transform="translate(0,{AXIS_PAD})">{"".join(elements)}</g></svg>'
        '<span class="axis">contribution per layer<br>(this document\'s scale)</span></div>'
    )


def _bar_axis(scale: float, width: int, height: int) -> list[str]:
    """The zero line and a value axis at the left: +scale at the top, 0, -scale at the bottom."""
    middle, right = height / 2, AXIS_WIDTH + width
    ticks = ((2.0, _tick(scale)), (middle, "0"), (height - 2.0, _tick(-scale)))
    elements = [
        f'<line x1="{AXIS_WIDTH}" y1="{middle}" x2="{right}" y2="{middle}" stroke="#999" stroke-width="1"/>',
        f'<line x1="{AXIS_WIDTH - 0.5}" y1="2" x2="{AXIS_WIDTH - 0.5}" y2="{height - 2}" stroke="#bbb" stroke-width="1"/>',
    ]
    for y, label in ticks:
        elements.append(f'<line x1="{AXIS_WIDTH - 4}" y1="{y:.1f}" x2="{AXIS_WIDTH}" y2="{y:.1f}" stroke="#bbb" stroke-width="1"/>')
        elements.append(f'<text x="{AXIS_WIDTH - 6}" y="{y + 3.5:.1f}" text-anchor="end">{_esc(label)}</text>')
    return elements


def _tick(value: float) -> str:
    """An axis label to 3 significant digits that fits the axis: `+1390` rather than `+1.39e+03` below a million."""
    text = f"{value:+.3g}"
    return f"{float(text):+.0f}" if "e+" in text and abs(float(text)) < 1e6 else text
