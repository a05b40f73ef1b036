"""Report logic: schema checks, escaping of untrusted text, colours, token display and per-layer aggregation; what a
reader sees first (results, not settings), decoded words, duplicate marks, bar scales and embedded plots."""

from __future__ import annotations

import json
import random
import re
from html.parser import HTMLParser

import pytest

from pretrace.errors import PretraceError
from pretrace.report import layer_of, layer_scores, load_results, write_report
from pretrace.report.html import MAX_ALPHA, SHADE_LEVELS, display_token, format_score, layer_bars, shade_class
from pretrace.report.text import token_texts, words

HOSTILE = '<script>alert("owned")</script> & </div> "quoted" <img src=x onerror=alert(1)>'
QUERIES = [
    ("capital-france", "Q: What is the capital of France?\nA:", " Paris"),
    ("bees-<b>", "Bees make honey from", " nectar they collect from flowers."),
    ("rust-borrow", "In Rust, a mutable reference", " cannot coexist with other references."),
]
DOCUMENTS = [
    "Paris is the capital and most populous city of France, on the Seine.",
    "Honeybees gather nectar and turn it into honey inside the hive.",
    "The borrow checker enforces that a value has one mutable reference at a time.",
    "Lyon and Marseille are large French cities, but Paris is the capital.\nIt hosts the government.",
    HOSTILE,
]
MODULES = [f"gpt_neox.layers.{layer}.{part}" for layer in range(6) for part in ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")]


def gpt2_style_tokens(text: str) -> list[str]:
    """Byte-level BPE look-alike: words carry a leading 'Ġ' for the space before them, newlines are 'Ċ'."""
    return [piece.replace(" ", "Ġ").replace("\n", "Ċ") for piece in re.findall(r" ?[^\s]+|\n", text)]


def split(total: float, parts: int, rng: random.Random) -> list[float]:
    """`parts` signed numbers that sum to `total` (up to rounding), like real contributions."""
    raw = [rng.gauss(0.0, 1.0) for _ in range(parts)]
    shift = (total - sum(raw)) / parts
    return [value + shift for value in raw]


def fake_rows(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for query_id, prompt, completion in QUERIES:
        documents, top_score = [], rng.uniform(5.0, 15.0)
        for position, text in enumerate(rng.sample(DOCUMENTS[:-1], 4) + [HOSTILE]):
            score = top_score / (position + 1) - 1.5 * (position == 4)
            tokens = gpt2_style_tokens(text)
            documents.append({
                "id": f"doc-{DOCUMENTS.index(text)}", "text": text, "score": score, "rank": position + 1,
                "retrieval_rank": rng.randint(1, 50) if position % 2 == 0 else None,
                "tokens": tokens, "token_scores": split(score, len(tokens), rng),
                "module_scores": dict(zip(MODULES + ["embed_out"], split(score, len(MODULES) + 1, rng))),
            })
        rng.shuffle(documents)  # the report must order by rank, not by file order
        rows.append({"query_id": query_id, "prompt": prompt, "completion": completion,
                     "measured_completion": completion.strip(), "documents": documents})
    return rows


class ElementCollector(HTMLParser):
    """Tags, attributes and text of a page, to check what a browser would build from it."""

    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> ElementCollector:
    collector = ElementCollector()
    collector.feed(page)
    return collector


@pytest.fixture(scope="module")
def report_page(tmp_path_factory):
    path = write_report(fake_rows(), tmp_path_factory.mktemp("report") / "report.html", title="Test <report>",
                        run_info={"model": {"name": "tiny-neox", "layers": 6}, "timings": {"fit_s": 1.5}})
    return path.read_text(encoding="utf-8")


EMBEDDED_PNG = "data:image/png;base64,"


def test_untrusted_text_is_escaped_and_page_is_self_contained(report_page):
    page = parse(report_page)
    tags = [tag for tag, _ in page.elements]
    assert "script" not in tags and "b" not in tags
    assert not any("onerror" in attrs for _, attrs in page.elements)
    assert all(attrs["src"].startswith(EMBEDDED_PNG) for tag, attrs in page.elements if tag == "img")  # only the plots
    text = "".join(page.text)
    assert 'alert("owned")' in text and "bees-<b>" in text and "Test <report>" in text
    # nothing is loaded from anywhere: no src/href except in-page anchors and the embedded plots
    links = [attrs.get("href") or attrs.get("src") for _, attrs in page.elements if "href" in attrs or "src" in attrs]
    assert links and all(link.startswith(("#", EMBEDDED_PNG)) for link in links)


def test_every_query_is_linked_from_the_summary_and_documents_follow_rank(report_page):
    page = parse(report_page)
    section_ids = [attrs["id"] for tag, attrs in page.elements if tag == "section" and attrs.get("class") == "query"]
    summary = parse(report_page.split('<table class="summary">')[1].split("</table>")[0])
    summary_links = [attrs["href"] for tag, attrs in summary.elements if tag == "a"]
    assert section_ids == ["q1", "q2", "q3"]
    assert summary_links == [link for q in (1, 2, 3) for link in (f"#q{q}", f"#q{q}-d1")]  # the query, its top document
    document_ids = {attrs["id"] for tag, attrs in page.elements if tag == "li"}
    assert {link[1:] for link in summary_links} <= set(section_ids) | document_ids
    for section in re.split(r'<section class="query"', report_page)[1:]:
        ranks = [int(rank) for rank in re.findall(r'<span class="rank">#(\d+)</span>', section)]
        assert ranks == [1, 2, 3, 4, 5]
    assert "retrieval rank" in report_page and "measured completion" in report_page
    assert "model.name" in report_page and "tiny-neox" in report_page


def test_word_spans_show_each_contribution_and_rebuild_the_text(report_page):
    top = min(fake_rows()[0]["documents"], key=lambda doc: doc["rank"])
    # the first document shown is the rank-1 one: one span per word, its summed value first in the tooltip
    first_doc = parse(re.search(r'<div class="tokens text">(.*?)</div></li>', report_page, re.S).group(1))
    titles = [attrs["title"] for tag, attrs in first_doc.elements if tag == "span"]
    expected = words(token_texts(top["tokens"], top["text"])[0], top["token_scores"])
    assert [title.split(" from ")[0] for title in titles] == [format_score(word.score) for word in expected]
    assert "".join(first_doc.text) == top["text"] and "Ġ" not in report_page


def test_shade_class_is_red_for_positive_blue_for_negative_and_scaled():
    assert shade_class(2.0, 2.0) == f"p{SHADE_LEVELS}"
    assert shade_class(-1.0, 2.0) == f"n{SHADE_LEVELS // 2}"
    assert shade_class(5.0, 2.0) == f"p{SHADE_LEVELS}"  # clipped at the document's scale
    assert shade_class(0.01, 2.0) is None  # too faint to see
    assert shade_class(1.0, 0.0) is None
    assert shade_class(float("nan"), 1.0) is None


def test_shade_classes_are_styled(report_page):
    for name in (f"p{SHADE_LEVELS}", f"n{SHADE_LEVELS}", "p1", "n1"):
        assert re.search(rf"\.{name}\{{background:rgba\(", report_page)
    assert f".p{SHADE_LEVELS}{{background:rgba(214,39,40,{MAX_ALPHA})}}" in report_page


def test_display_token_turns_bpe_markers_into_whitespace():
    assert display_token("Ġcapital") == " capital"
    assert display_token("▁Paris") == " Paris"
    assert display_token("Ċ") == "\n"
    assert display_token("<0x0A>") == "\n"
    assert display_token("<0xE2>") == "<0xE2>"  # a lone non-ASCII byte has no character of its own
    assert display_token("plain") == "plain"


@pytest.mark.parametrize("name, layer", [
    ("gpt_neox.layers.3.mlp.dense_4h_to_h", 3),
    ("model.layers.12.self_attn.q_proj", 12),
    ("transformer.h.0.attn.c_attn", 0),
    ("model.layers.5.mlp.experts.7.down_proj", 5),
    ("lm_head", None),
    ("embed_out", None),
])
def test_layer_of_reads_the_layer_index(name, layer):
    assert layer_of(name) == layer


def test_layer_scores_sum_modules_per_layer_in_layer_order():
    module_scores = {
        "model.layers.10.mlp.down_proj": 1.0, "lm_head": -0.5, "model.layers.2.mlp.up_proj": 2.0,
        "model.layers.10.self_attn.o_proj": -3.0, "model.layers.2.self_attn.q_proj": 0.25,
    }
    totals = layer_scores(module_scores)
    assert list(totals) == [2, 10, "lm_head"]
    assert totals == pytest.approx({2: 2.25, 10: -2.0, "lm_head": -0.5})
    assert sum(totals.values()) == pytest.approx(sum(module_scores.values()))


def test_layer_bars_draw_one_signed_bar_per_layer():
    svg = parse(layer_bars({0: 1.0, 1: -0.5, 2: 0.0}, width=300, height=60))
    rects = [attrs for tag, attrs in svg.elements if tag == "rect"]
    assert len(rects) == 3
    heights = [float(rect["height"]) for rect in rects]
    assert heights[0] == pytest.approx(28.0) and heights[1] == pytest.approx(14.0)
    assert float(rects[0]["y"]) + heights[0] == pytest.approx(30.0)  # positive grows up from the zero line
    assert float(rects[1]["y"]) == pytest.approx(30.0)                # negative grows down from it
    assert rects[0]["fill"] == "rgb(214,39,40)" and rects[1]["fill"] == "rgb(31,119,180)"
    assert "layer 1: -0.5" in "".join(svg.text)


def test_results_file_round_trips_and_bad_rows_name_the_problem(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in fake_rows()), encoding="utf-8")
    rows = load_results(path)
    assert [row["query_id"] for row in rows] == [query_id for query_id, _, _ in QUERIES]
    assert all([doc["rank"] for doc in row["documents"]] == [1, 2, 3, 4, 5] for row in rows)

    broken = fake_rows()
    broken[1]["documents"][0]["token_scores"].pop()
    with pytest.raises(PretraceError, match=r"row 2 \(query 'bees-<b>'\) document 1: .* tokens but"):
        load_results(broken)
    broken = fake_rows()
    broken[0]["documents"][2]["score"] = None
    with pytest.raises(PretraceError, match="'score' must be a number"):
        load_results(broken)
    with pytest.raises(PretraceError, match="missing field 'documents'"):
        load_results([{"query_id": "q", "prompt": "p", "completion": "c"}])
    with pytest.raises(PretraceError, match="no queries"):
        load_results([])
    with pytest.raises(PretraceError, match="no such file"):
        load_results(tmp_path / "absent.jsonl")


def test_write_report_is_atomic_and_accepts_documents_without_explanations(tmp_path):
    rows = [{"query_id": "bm25-only", "prompt": "p", "completion": "c",
             "documents": [{"id": "d", "text": "plain <text>", "score": 3.0, "rank": 1}]}]
    out = write_report(rows, tmp_path / "sub" / "report.html")
    page = out.read_text(encoding="utf-8")
    assert "plain &lt;text&gt;" in page and "<svg" not in page
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left behind


def test_run_info_from_file_and_document_cap(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"method": "ekfac", "damping": 0.001}), encoding="utf-8")
    page = write_report(fake_rows(), tmp_path / "report.html", run_info=tmp_path / "run.json",
                        max_documents=2, figures={}).read_text(encoding="utf-8")
    assert '<td>damping</td><td>0.001</td>' in page
    assert len(re.findall(r'<li class="doc[ "]', page)) == 2 * len(QUERIES)
