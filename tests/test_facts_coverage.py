"""Corpus coverage of the facts' entities (the paper's step 8), counted by hand on small fixtures: Wikidata ids of
T-REx/LAMA, a corpus with a `wikidata_id` field, names for facts without ids; and both analyses in a bundled run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrace.bench.facts.coverage import count_coverage, folder_coverage, name_matches, trex_lama_coverage
from pretrace.bench.facts.trex_lama import build_trex_lama_benchmark, shipped_questions
from pretrace.config import from_flags
from tiny import save_tiny_model

FIXTURES = Path(__file__).parent / "fixtures" / "facts"
TREX, LAMA = FIXTURES / "trex", FIXTURES / "lama"


def _count(present: int, total: int) -> dict:
    return {"total": total, "present": present, "share": pytest.approx(present / total)}


def test_lama_ids_against_trex_articles_and_annotations_counted_by_hand():
    """LAMA's 6 facts: P1376 Q90→Q142, Q270→Q36; P19 Q7186→Q270, Q937→Q3012; P36 Q142→Q90, Q36→Q270. T-REx's
    articles are Q90 (Paris), Q7186 (Marie Curie) and Q270 (Warsaw); its annotations also name Q142, Q36, Q1471
    and Q1093371 (never Einstein Q937 or Ulm Q3012)."""
    result = trex_lama_coverage(TREX, LAMA / "TREx")
    assert result["count"] == 6 and result["facts"].startswith("all 6 LAMA T-REx facts")
    articles, mentions = result["matches"]["articles"], result["matches"]["mentions"]
    assert articles["compares"] == mentions["compares"] == "Wikidata id"
    # subjects Q90 Q270 Q7186 Q937 Q142 Q36; objects Q142 Q36 Q270 Q3012 Q90; only Curie→Warsaw has both as articles
    assert articles["overall"] == {"facts": 6, "subjects": _count(3, 6), "objects": _count(2, 5), "entities": _count(3, 7), "both": _count(1, 6)}
    assert mentions["overall"] == {"facts": 6, "subjects": _count(5, 6), "objects": _count(4, 5), "entities": _count(5, 7), "both": _count(5, 6)}
    assert articles["relations"]["P19"] == {"facts": 2, "subjects": _count(1, 2), "objects": _count(1, 2), "entities": _count(2, 4), "both": _count(1, 2)}
    assert articles["relations"]["P36"] == {"facts": 2, "subjects": _count(0, 2), "objects": _count(2, 2), "entities": _count(2, 4), "both": _count(0, 2)}
    assert mentions["relations"]["P1376"]["both"] == _count(2, 2)


def test_a_corpus_with_wikidata_ids_is_matched_on_them():
    """The fixture benchmark's 5 facts (Einstein has no evidence) against records naming Q90, Q36 and Q270 as articles:
    subjects Q90 Q270 Q7186 Q142 Q36 (3 present), objects Q142 Q36 Q270 Q90 (3), both: Warsaw→Poland, Poland→Warsaw."""
    benchmark, _ = build_trex_lama_benchmark(TREX, LAMA / "TREx", shipped_questions())
    records = [{"text": "a", "wikidata_id": "Q90"}, {"text": "b", "wikidata_id": ["http://www.wikidata.org/entity/Q36", "Q270"]}, {"text": "c"}]
    result = folder_coverage(benchmark, records)
    assert list(result["matches"]) == ["articles"]  # no annotation names anything more
    assert result["matches"]["articles"]["overall"] == {"facts": 5, "subjects": _count(3, 5), "objects": _count(3, 4), "entities": _count(3, 5),
                                                        "both": _count(2, 5)}


def test_names_are_matched_as_titles_and_surface_forms_counted_by_hand():
    names = {"France": {"France", "French Republic"}, "Paris": {"Paris"}, "euro": {"euro", "Euro", "euros"}, "Kyiv": {"Kyiv", "Kiev"}}
    matches = name_matches(names, ["France", "Euro", "Kiev", "Ukraine (band)"], ["Paris is the capital of the French Republic.", "Prices are in euros."])
    assert {name: sorted(present) for name, (_, _, present) in matches.items()} == {"titles": ["France", "Kyiv", "euro"], "surface_forms": ["France", "Paris", "euro"]}
    assert "not a Wikidata id" in matches["titles"][0] and "surface-form match" in matches["surface_forms"][0]
    facts = [("P36", "France", "Paris"), ("P38", "France", "euro"), ("P36", "Ukraine", "Kyiv"), ("P36", "Atlantis", "Poseidonis"), ("P38", "France", "euro")]
    titles = count_coverage(facts, matches["titles"][2])  # the repeated fact counts once
    assert titles["overall"] == {"facts": 4, "subjects": _count(1, 3), "objects": _count(2, 4), "entities": _count(3, 7), "both": _count(1, 4)}
    assert titles["relations"]["P36"] == {"facts": 3, "subjects": _count(1, 3), "objects": _count(1, 3), "entities": _count(2, 6), "both": _count(0, 3)}
    surface = count_coverage(facts, matches["surface_forms"][2])
    assert surface["overall"]["both"] == _count(2, 4) and surface["relations"]["P38"]["both"] == _count(1, 1)


def test_the_build_prints_the_coverage_and_caches_it(tmp_path, capsys):
    from pretrace.bench.facts.run import FactTracingSettings, _Run

    settings = from_flags(FactTracingSettings, out=str(tmp_path / "out"), data="trex-lama", trex=str(TREX), lama=str(LAMA / "TREx"))
    run = _Run(settings)
    benchmark, _ = run.benchmark()
    first = run.coverage(benchmark)
    printed = capsys.readouterr().out
    assert "an article of T-REx: subjects 3/6 (50.0%), objects 2/5 (40.0%), facts with both 1/6 (16.7%)" in printed
    again = _Run(settings)
    again.benchmark()
    assert again.coverage(benchmark) == first and again.cache.statuses["coverage"] == "reused"


@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory):
    """The default (bundled) data with a tiny model: 4 query facts, 8 fine-tuning facts."""
    from pretrace.bench.facts.run import FactTracingSettings, run_fact_tracing

    root = tmp_path_factory.mktemp("bundled-run")
    model = save_tiny_model(root / "model", "llama", dtype=torch.float32)
    settings = from_flags(FactTracingSettings, out=str(root / "out"), model=str(model), queries=4, finetune_facts=8, alphas="0.1", candidates=3,
                          random_candidates=4, sharing_candidates=2, fit_sentences=6, preset="all", last_layers=1, batch_size=4, max_length=64,
                          device="cpu", query_rank=0, bootstrap=200)
    return root, run_fact_tracing(settings)


def test_bundled_run_reports_name_coverage_of_every_candidate_fact(bundled_run):
    from pretrace.bench.facts.bundled import bundled_stats

    root, results = bundled_run
    coverage = results["coverage"]
    manifest = bundled_stats(root / "out" / "benchmark")
    assert coverage["count"] == manifest["build"]["candidate_facts"] and "no Wikidata ids" in coverage["facts"]
    assert list(coverage["matches"]) == ["titles", "surface_forms"] and all(m["compares"] == "name" for m in coverage["matches"].values())
    surface = coverage["matches"]["surface_forms"]
    assert surface["overall"]["both"]["present"] >= manifest["facts"]  # a fact with an evidence sentence has both named
    assert set(surface["relations"]) == set(manifest["facts_per_relation"])
    text = (root / "out" / "results.md").read_text()
    assert "| overall |" in text and "surface-form match, not a Wikidata id" in text and "| surface forms: both |" in text


def test_bundled_run_probes_the_query_facts_in_three_styles(bundled_run):
    from pretrace.bench.facts.benchmark import read_benchmark
    from pretrace.bench.facts.bundled_facts import CLOZE_TEMPLATES, bundled_fact_source

    root, results = bundled_run
    probe = results["lama_probe"]
    assert probe["facts"] == "query facts, a seeded sample of --queries 4" and probe["queried"] == 4
    assert set(probe["models"]) == {"pretrained", "finetuned@0.1"} and set(probe["styles"]) == {"question", "evidence", "cloze"}
    assert probe["styles"]["cloze"]["probed"] == 4 and "bundled cloze templates" in probe["styles"]["cloze"]["prompt"]
    benchmark, aliases = read_benchmark(root / "out" / "benchmark"), bundled_fact_source().aliases
    facts = {f.fact_id: f for f in benchmark.facts}
    ranks = {style: json.loads((root / "out" / f"pretrained-{style}.probe.json").read_text())["ranks"] for style in ("evidence", "cloze")}
    assert all(set(r) <= set(results["query_ids"]) and len(r) == probe["styles"][style]["probed"] for style, r in ranks.items())
    example, fact = probe["styles"]["evidence"]["example"], facts[next(iter(ranks["evidence"]))]  # the first fact probed
    rests = [benchmark.sentences[i].text[len(example["prompt"]):] for i in fact.evidence_ids if benchmark.sentences[i].text.startswith(example["prompt"])]
    assert example["completion"] == fact.completion and rests  # cut right before a name of the object
    assert any(rest.lstrip().startswith(name) for rest in rests for name in aliases[fact.object_key] | {fact.object})
    cloze = probe["styles"]["cloze"]["example"]
    first = facts[results["query_ids"][0]]
    assert cloze["prompt"] == CLOZE_TEMPLATES[first.relation].split("[Y]")[0].replace("[X]", first.subject).rstrip()
