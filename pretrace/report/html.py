"""One self-contained `report.html`: every query, its top documents, tokens shaded by contribution, layer bars.

The page has no scripts and no external assets, so it opens from disk, offline, anywhere. Document text is
untrusted (it comes from a pre-training corpus), so every piece of text passes through `html.escape`.
"""

from __future__ import annotations

import codecs
import html
import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

from pretrace.report.results import finite_scale, layer_label, layer_scores, load_results
from pretrace.storage import read_json

POSITIVE_RGB = (214, 39, 40)   # red: the document/token/layer raises the query's score
NEGATIVE_RGB = (31, 119, 180)  # blue: it lowers it
MAX_ALPHA = 0.85               # keep the darkest shade readable under black text
SHADE_LEVELS = 10              # shades per sign; finer steps are not visible
_BYTE_TOKEN = re.compile(r"<0x([0-7][0-9A-Fa-f])>")
_BPE_MARKERS = str.maketrans({"Ġ": " ", "▁": " ", "Ċ": "\n", "ĉ": "\t"})

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:16px 24px;color:#222;background:#fff}
h1{font-size:22px;margin:8px 0 12px}h2{font-size:18px;margin:28px 0 8px;border-top:2px solid #ddd;padding-top:14px}
table{border-collapse:collapse;margin:6px 0 14px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.run td:first-child{color:#555;font-family:ui-monospace,monospace}
.legend span{padding:1px 6px;margin-right:6px;border-radius:3px}
.text{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px}
.prompt,.completion{padding:6px 10px;border-radius:4px;margin:4px 0}.prompt{background:#f6f6f6}.completion{background:#fff6d5}
.label{font-size:12px;color:#666;text-transform:uppercase;letter-spacing:.04em}
ol.docs{padding-left:0;list-style:none}li.doc{border:1px solid #ddd;border-radius:6px;padding:8px 12px;margin:10px 0}
.doc-head{display:flex;flex-wrap:wrap;gap:14px;align-items:center;margin-bottom:6px}
.doc-head .id{font-weight:600}.doc-head .score{font-variant-numeric:tabular-nums}
.tokens span{border-radius:2px}div.layers{display:flex;align-items:center;gap:10px;margin:2px 0 8px}.axis{font-size:12px;color:#666}
a{color:#1a55a0}
"""


def write_report(
    results: str | Path | Iterable[Mapping],
    out_path: str | Path,
    title: str = "pretrace: influential training documents",
    run_info: str | Path | Mapping | None = None,
    max_documents: int | None = None,
) -> Path:
    """Render `results.jsonl` (a path, or its rows) into one HTML file, written atomically; returns its path.

    `run_info` (a mapping or the path of `run.json`) becomes a header table; `max_documents` caps the documents
    shown per query (all of them by default).
    """
    rows = load_results(results)
    info = _read_run_info(run_info)
    page = _page(title, rows, info, max_documents)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out_path)
    return out_path


def _read_run_info(run_info: str | Path | Mapping | None) -> Mapping | None:
    if run_info is None or isinstance(run_info, Mapping):
        return run_info
    return read_json(run_info)


def _page(title: str, rows: list[dict], info: Mapping | None, max_documents: int | None) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{_CSS}{_shade_css()}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
    ]
    if info:
        parts.append(_run_table(info))
    parts.append(_legend())
    parts.append(_summary(rows))
    for index, row in enumerate(rows):
        parts.append(_query_section(index, row, max_documents))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def format_score(value: float) -> str:
    return f"{value:+.3g}" if math.isfinite(value) else str(value)


def shade_class(value: float, scale: float) -> str | None:
    """CSS class on the red(+)/blue(-) scale: `p1`..`p{SHADE_LEVELS}` or `n1`.., by |value| / scale; None if unshaded.

    Classes instead of inline colours keep a page of many thousands of tokens about half as large.
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


def display_token(token: str) -> str:
    """A tokenizer piece as the text it stands for: BPE space/newline markers and ASCII byte tokens decoded."""
    token = _BYTE_TOKEN.sub(lambda match: chr(int(match.group(1), 16)), token)
    return token.translate(_BPE_MARKERS)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (also Llama 3's, SmolLM's): printable Latin-1 bytes stand for themselves,
    the other bytes for the code points 256, 257, ... in byte order (space -> 'Ġ', 0xA0 -> 'ł')."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = [byte for byte in range(256) if byte not in visible]
    return {**{chr(byte): byte for byte in visible}, **{chr(256 + n): byte for n, byte in enumerate(hidden)}}


_BYTE_LEVEL = _byte_level_alphabet()


def display_tokens(tokens: list[str]) -> list[str]:
    """Each token's text. Byte-level BPE pieces are decoded as UTF-8 across token boundaries, so a character split
    over two tokens (é, non-breaking space) shows once, on the token that completes it; other vocabularies
    (SentencePiece '▁', word-level) go through `display_token` one piece at a time."""
    if not all(char in _BYTE_LEVEL for token in tokens for char in token):
        return [display_token(token) for token in tokens]
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [utf8.decode(bytes(_BYTE_LEVEL[char] for char in token)) for token in tokens]


def _flatten(info: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in info.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            items.extend(_flatten(value, f"{name}."))
        else:
            items.append((name, value))
    return items


def _run_table(info: Mapping) -> str:
    cells = []
    for key, value in _flatten(info):
        shown = value if isinstance(value, str) else json.dumps(value, default=str)
        cells.append(f"<tr><td>{_esc(key)}</td><td>{_esc(shown)}</td></tr>")
    return '<table class="run"><tbody>' + "".join(cells) + "</tbody></table>"


def _legend() -> str:
    return (
        '<p class="legend">Token shading, normalised per document: '
        f'<span class="p{SHADE_LEVELS}">positive contribution</span>'
        f'<span class="n{SHADE_LEVELS}">negative contribution</span>'
        "hover a token or layer bar for its value.</p>"
    )


def _query_anchor(index: int) -> str:
    return f"q{index + 1}"


def _summary(rows: list[dict]) -> str:
    lines = ['<h2 id="summary">Queries</h2><table class="summary"><thead><tr>',
             "<th>#</th><th>query</th><th>prompt</th><th>completion</th><th>top document</th><th>score</th>",
             "</tr></thead><tbody>"]
    for index, row in enumerate(rows):
        top = row["documents"][0] if row["documents"] else None
        lines.append(
            f'<tr><td class="num">{index + 1}</td>'
            f'<td><a href="#{_query_anchor(index)}">{_esc(row["query_id"])}</a></td>'
            f'<td>{_esc(_shorten(row["prompt"]))}</td><td>{_esc(_shorten(row["completion"]))}</td>'
            f'<td>{_esc(top["id"]) if top else "—"}</td>'
            f'<td class="num">{format_score(top["score"]) if top else "—"}</td></tr>'
        )
    lines.append("</tbody></table>")
    return "".join(lines)


def _shorten(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _query_section(index: int, row: dict, max_documents: int | None) -> str:
    documents = row["documents"][:max_documents]
    parts = [
        f'<section class="query" id="{_query_anchor(index)}">',
        f'<h2>{index + 1}. {_esc(row["query_id"])} <a href="#summary" title="back to the summary">↑</a></h2>',
        f'<div class="label">prompt</div><div class="prompt text">{_esc(row["prompt"])}</div>',
        f'<div class="label">completion</div><div class="completion text">{_esc(row["completion"])}</div>',
    ]
    measured = row.get("measured_completion")
    if measured is not None and measured != row["completion"]:
        parts.append(f'<div class="label">measured completion</div><div class="completion text">{_esc(measured)}</div>')
    if documents:
        parts.append('<ol class="docs">' + "".join(_document(doc) for doc in documents) + "</ol>")
    else:
        parts.append("<p>No documents.</p>")
    parts.append("</section>")
    return "\n".join(parts)


def _document(doc: dict) -> str:
    retrieval = doc.get("retrieval_rank")
    head = [
        f'<span class="rank">#{doc["rank"]}</span>',
        f'<span class="id">{_esc(doc["id"])}</span>',
        f'<span class="score">score {format_score(doc["score"])}</span>',
    ]
    if retrieval is not None:
        head.append(f'<span class="retrieval">retrieval rank {_esc(retrieval)}</span>')
    module_scores = doc.get("module_scores")
    bars = layer_bars(layer_scores(module_scores)) if module_scores else ""
    return (
        f'<li class="doc"><div class="doc-head">{"".join(head)}</div>{bars}'
        f'<div class="tokens text">{_document_text(doc)}</div></li>'
    )


def _document_text(doc: dict) -> str:
    tokens = doc.get("tokens")
    if tokens is None:
        return _esc(doc["text"])
    scores = [float(value) for value in doc["token_scores"]]
    scale = finite_scale(scores)
    spans = []
    for text, value in zip(display_tokens(tokens), scores):
        shade = shade_class(value, scale)
        css_class = f' class="{shade}"' if shade else ""
        spans.append(f'<span{css_class} title="{format_score(value)}">{_esc(text)}</span>')
    return "".join(spans)


def layer_bars(totals: Mapping[object, float], width: int = 360, height: int = 56) -> str:
    """Inline SVG: one bar per layer, up (red) for positive and down (blue) for negative, normalised per document."""
    if not totals:
        return ""
    scale = finite_scale(totals.values())
    slot = width / len(totals)
    middle = height / 2
    rects = [f'<line x1="0" y1="{middle}" x2="{width}" y2="{middle}" stroke="#999" stroke-width="1"/>']
    for position, (key, value) in enumerate(totals.items()):
        fraction = abs(value) / scale if scale > 0 and math.isfinite(value) else 0.0
        bar = max(fraction * (middle - 2), 0.5)
        top = middle - bar if value > 0 else middle
        colour = "rgb(%d,%d,%d)" % (POSITIVE_RGB if value > 0 else NEGATIVE_RGB)
        rects.append(
            f'<rect x="{position * slot + slot * 0.1:.1f}" y="{top:.1f}" width="{slot * 0.8:.1f}" height="{bar:.1f}" '
            f'fill="{colour}"><title>{_esc(layer_label(key))}: {format_score(value)}</title></rect>'
        )
    first, last = layer_label(next(iter(totals))), layer_label(list(totals)[-1])
    return (
        f'<div class="layers"><svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="contribution per layer">{"".join(rects)}</svg>'
        f'<span class="axis">per layer, {_esc(first)} → {_esc(last)}</span></div>'
    )
