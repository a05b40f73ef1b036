"""What a reader of report.html sees: the results before any setting, only the settings that shaped the scores,
readable words shaded whole, duplicates marked, bars with a scale, and the plots inside the one file."""

from __future__ import annotations

import base64
import re

import pytest

from pretrace.report import duplicate_ranks, write_report
from pretrace.report.html import layer_bars
from pretrace.report.settings import shown_settings
from pretrace.report.text import token_texts, words
from test_report_html import fake_rows, parse

PNG_URI = "data:image/png;base64,"
# scores.json as an older pretrace wrote it: one flat list with every method's defaults
FLAT_SETTINGS = {
    "queries": "q.jsonl", "train": "docs.jsonl", "out": "scores/", "overwrite": False, "model": "model/", "method": "ekfac",
    "damping": None, "damping_factor": 0.1, "top_k": 10, "shard": "documents", "projection_dim": 2048, "trak_models": None,
    "trak_ensemble": 0, "trak_epochs": 1, "trak_lr": 0.001, "bm25_method": "lucene", "curvature": "ggn", "iterations": 100,
    "tolerance": 0.0001, "lissa_depth": 1000, "lissa_repeats": 1, "arnoldi_rank": 20, "arnoldi_iterations": 100,
    "exact_max_parameters": 20000, "solver_seed": 0, "representation_layer": -1, "checkpoint_every": 50,
}
NESTED_SETTINGS = {
    "queries": "q.jsonl", "train": "docs.jsonl", "out": "scores/", "overwrite": False, "model": "model/", "factors": None,
    "method": {"name": "cg", "curvature": "ggn", "fit_data": None, "solver_seed": 0, "iterations": 500, "tolerance": 0.001},
    "damping": {"absolute": 0.01, "factor": None, "finetuned": None},
    "outputs": {"top_k": 10, "explain": True, "per_module": False, "checkpoint_every": 50},
    "placement": {"shard": "documents", "factors_device": "model", "shard_factors": False},
}


def run_info(settings: dict, method: str) -> dict:
    return {"method": method, "multi_stage": False, "settings": settings,
            "timings": {"one_off_seconds": 1.5597921059998043, "per_query_seconds": 0.2023255579504621, "resumed_batches": 0}}


def test_the_page_opens_with_the_results_and_folds_the_settings(tmp_path):
    """Before the first query: the title, one folded settings line and the table of queries with their answers and
    top documents, decoded. No other method's settings anywhere, and no float printed to 16 digits."""
    page = write_report(fake_rows(), tmp_path / "report.html", run_info=run_info(FLAT_SETTINGS, "ekfac"),
                        figures={}).read_text(encoding="utf-8")
    first_screen = page.split('<section class="query"')[0]
    body = first_screen.split("<body>")[1]
    unfolded = re.sub(r"<details[^>]*>.*?</details>", "", body, flags=re.S)
    assert "<details" in body and "<details open" not in body
    assert '<table class="run"' not in unfolded and '<table class="summary"' in unfolded
    assert re.search(r"<summary>Settings: method ekfac, single-stage", body)
    summary = parse(unfolded.split('<table class="summary">')[1])
    text = "".join(summary.text)
    top = min(fake_rows()[0]["documents"], key=lambda doc: doc["rank"])
    assert " Paris" in text and top["text"][:40] in text and "+" in text  # the answer, the top document's text, its score
    assert not re.search(r"trak|lissa|arnoldi|bm25|projection|representation|exact_max", page, re.I)
    assert "1.5597921059998043" not in page and "<td>timings.one_off_seconds</td><td>1.56 s</td>" in page
    assert "checkpoint_every" not in page and "resumed_batches" not in page and "overwrite" not in page


def test_shown_settings_keep_the_method_used_and_its_own():
    flat = dict(shown_settings(run_info(FLAT_SETTINGS, "arnoldi")))
    assert flat["settings.arnoldi_rank"] == "20" and flat["settings.curvature"] == "ggn"
    assert not any(key.startswith(("settings.lissa", "settings.trak")) or key == "settings.tolerance" for key in flat)
    nested = dict(shown_settings(run_info(NESTED_SETTINGS, "cg")))
    assert nested["settings.method.iterations"] == "500" and nested["settings.method.tolerance"] == "0.001"
    assert nested["settings.damping.absolute"] == "0.01" and nested["settings.outputs.top_k"] == "10"
    assert "method" not in nested and "settings.method.name" not in nested  # in the summary line instead
    assert not any("placement" in key or "factor" in key or "per_module" in key for key in nested)
    bm25 = dict(shown_settings(run_info(FLAT_SETTINGS, "bm25")))
    assert "settings.bm25_method" in bm25 and "settings.damping_factor" not in bm25  # BM25 damps nothing


GPT2_TOKENS = ["C", "airo", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠEgypt", "'s", "Ċ", "Ġgovernment", "."]
GPT2_SCORES = [1.0, 2.0, 0.0, 0.0, 4.0, 0.0, 0.5, 0.25, 0.0, -1.0, 0.0]
GPT2_TEXT = "Cairo is the capital of Egypt's\n government. It is large."


def test_tokens_are_decoded_and_whole_words_shaded(tmp_path):
    rows = [{"query_id": "q", "prompt": "p", "completion": " Cairo", "documents": [
        {"id": "d", "text": GPT2_TEXT, "score": sum(GPT2_SCORES), "rank": 1, "tokens": GPT2_TOKENS, "token_scores": GPT2_SCORES}]}]
    page = write_report(rows, tmp_path / "report.html", figures={}).read_text(encoding="utf-8")
    assert "Ġ" not in page and "Ċ" not in page
    document = re.search(r'<div class="tokens text">(.*?)</div></li>', page, re.S).group(1)
    assert "".join(parse(document).text) == GPT2_TEXT  # the document's own spacing, and the unscored rest after the tokens
    spans = re.findall(r'<span(?: class="(\w+)")? title="([^"]*)">([^<]*)</span>', document)
    assert spans[0] == ("p8", "+3 from 2 tokens: &#x27;C&#x27; +1, &#x27;airo&#x27; +2", "Cairo")  # one word, one shade
    assert spans[3] == ("p10", "+4", "capital") and '> <span class="p10" title="+4">capital<' in document  # space unshaded
    assert '<span class="unscored"' in page and "It is large." in page


def test_words_sum_their_tokens_and_follow_word_boundaries():
    pieces, rest = token_texts(GPT2_TOKENS, GPT2_TEXT)
    shown = words(pieces, GPT2_SCORES)
    assert [word.text for word in shown] == ["Cairo", "is", "the", "capital", "of", "Egypt", "'s", "\n", "government", "."]
    assert sum(word.score for word in shown) == pytest.approx(sum(GPT2_SCORES)) and rest == " It is large."
    # a word-level vocabulary stores no spaces: the document's own spacing is used
    assert token_texts(["the", "cat", "sat"], "the cat  sat")[0] == ["the", " cat", "  sat"]
    # a character split over two byte-level tokens stays one word; a special token is kept, the rest still aligned
    assert [word.text for word in words(*token_texts(["Caf", "Ã", "©", "Ġbar"], "Café bar")[:1], [1, 1, 1, 1])] == ["Café", "bar"]
    assert token_texts(["<s>", "▁the", "▁cat"], "the cat") == (["<s>", "the", " cat"], "")


def duplicated_rows() -> list[dict]:
    texts = ["Paris is the capital.", "Paris  is the\ncapital.", "Lyon is a city.", "Paris is the capital."]
    documents = [{"id": f"d{n}", "text": text, "score": 4.0 - n, "rank": n + 1} for n, text in enumerate(texts)]
    return [{"query_id": "q", "prompt": "p", "completion": "c", "documents": documents}]


def test_duplicates_are_marked_and_kept(tmp_path):
    assert duplicate_ranks(duplicated_rows()[0]["documents"]) == [None, 1, None, 1]
    page = write_report(duplicated_rows(), tmp_path / "report.html", figures={}).read_text(encoding="utf-8")
    items = [attrs for tag, attrs in parse(page).elements if tag == "li"]
    assert [item["id"] for item in items] == ["q1-d1", "q1-d2", "q1-d3", "q1-d4"]  # nothing dropped
    assert [item["class"] for item in items] == ["doc", "doc dup", "doc", "doc dup"]
    badges = re.findall(r'<a class="badge dup" href="(#[^"]+)"[^>]*>(duplicate of #\d+)</a>', page)
    assert badges == [("#q1-d1", "duplicate of #1"), ("#q1-d1", "duplicate of #1")]
    assert "2 of these 4 documents repeat the text of a higher-ranked one" in page


def test_layer_bars_have_a_value_scale_and_layer_labels():
    svg = layer_bars({0: 2.0, 1: -0.5, 2: 0.25})
    assert re.findall(r"<text[^>]*>([^<]*)</text>", svg) == ["+2", "0", "-2", "layer 0", "layer 2"]  # ± the largest |layer|
    assert re.findall(r"<text[^>]*>([^<]*)</text>", layer_bars({"lm_head": 0.0})) == ["+0", "0", "-0", "lm_head"]


def test_plots_are_embedded_in_the_page(tmp_path):
    """By default the report draws what its rows allow and embeds it; the page holds the PNGs, not links to them."""
    page = write_report(fake_rows(), tmp_path / "report.html").read_text(encoding="utf-8")
    sources = [attrs["src"] for tag, attrs in parse(page).elements if tag == "img"]
    assert len(sources) == 2 and all(source.startswith(PNG_URI) for source in sources)
    assert all(base64.b64decode(source[len(PNG_URI):])[:8] == b"\x89PNG\r\n\x1a\n" for source in sources)
    assert '<a class="muted" href="#plots">' in page and '<section id="plots">' in page
    no_layers = write_report(duplicated_rows(), tmp_path / "plain.html").read_text(encoding="utf-8")  # no module scores
    assert no_layers.count(f'<img src="{PNG_URI}') == 1
    fake_png = b"\x89PNG fake"
    given = write_report(duplicated_rows(), tmp_path / "given.html", figures={"my <plot>": fake_png}).read_text(encoding="utf-8")
    assert f'<img src="{PNG_URI}{base64.b64encode(fake_png).decode()}" alt="my &lt;plot&gt;">' in given
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".png"] == []  # nothing written beside the page
