"""The bundled benchmark from installed packages (Wikipedia leads, countryinfo, gensim's questions-words)."""

import json
import re

import pytest

from pretrace.bench.facts.bundled import build_bundled_benchmark, bundled_stats
from pretrace.bench.facts.bundled_facts import RELATIONS, _currency, _language
from pretrace.data.records import read_documents, read_queries
from pretrace.errors import PretraceError


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("facts") / "bundled"
    return folder, build_bundled_benchmark(folder, query_fraction=0.2, seed=0)


def _evidence(benchmark, fact_id):
    return [benchmark.sentences[i] for i in benchmark.fact(fact_id).evidence_ids]


def test_every_relation_has_facts_and_every_fact_has_evidence(built):
    folder, benchmark = built
    stats = bundled_stats(folder)
    assert stats["sentences"] == len(benchmark.sentences) > 30_000
    assert set(stats["facts_per_relation"]) == set(RELATIONS)
    assert stats["build"]["candidate_facts"] == stats["facts"] + stats["build"]["facts_without_evidence"]
    assert all(f.evidence_ids for f in benchmark.facts)
    assert all(f.subject_key != f.object_key for f in benchmark.facts)  # "Luxembourg, capital, Luxembourg" is dropped


def test_evidence_names_subject_and_object(built):
    benchmark = built[1]
    assert "Paris#0" in [s.source for s in _evidence(benchmark, "P36,France,Paris")]
    france = re.compile(r"\bFrance\b|French Republic|République française")
    for fact in benchmark.facts:
        if fact.subject_key == "France":  # the demonym "French" never stands for the country
            assert all(france.search(s.text) for s in _evidence(benchmark, fact.fact_id)), fact.fact_id
        if fact.relation == "P37":
            assert all(re.search(r"languages?|spoken|speak|tongue|lingua franca", s.text, re.I) for s in _evidence(benchmark, fact.fact_id))
    # aliases: "U.S." is the United States, "yen" the Japanese yen, "Kiev" the canonical Kyiv
    assert any("United States" not in s.text and "U.S." in s.text for s in _evidence(benchmark, "P1549,United States,American"))
    assert "Japanese yen#0" in [s.source for s in _evidence(benchmark, "P38,Japan,Japanese yen")]
    assert "P36,Ukraine,Kyiv" in benchmark.fact_to_ids() and "P36,Ukraine,Kiev" not in benchmark.fact_to_ids()


def test_questions_and_names():
    assert RELATIONS["P36"].ask("the United States") == "What is the capital of the United States?"
    assert _currency("DZD") == ("Algerian dinar", []) and _currency("EUR") == ("euro", []) and _currency("USN") is None
    assert _language("el") == "Greek" and _language("ms") == "Malay" and _language("fr") == "French"


def test_split_and_files_are_usable_by_pretrace(built):
    folder, benchmark = built
    subjects = lambda facts: {f.subject_key for f in facts}
    assert not subjects(benchmark.finetune_facts()) & subjects(benchmark.query_facts())
    assert len(benchmark.query_facts()) == pytest.approx(0.2 * len(benchmark.facts), abs=25)
    assert len(read_documents(folder / "corpus.jsonl")) == len(benchmark.sentences)
    queries = read_queries(folder / "queries.jsonl")
    assert [q.id for q in queries] == [f.fact_id for f in benchmark.query_facts()]
    assert queries[0].prompt.startswith("Question: ") and queries[0].prompt.endswith("?\nAnswer:")
    row = json.loads((folder / "facts.jsonl").read_text().splitlines()[0])
    assert set(row) >= {"fact_id", "subject", "relation", "object", "prompt", "completion", "evidence_ids"}


def test_built_folder_is_reused_and_guarded(built):
    folder, benchmark = built
    again = build_bundled_benchmark(folder, query_fraction=0.2, seed=0)
    assert again.facts == benchmark.facts and again.split == benchmark.split
    with pytest.raises(PretraceError, match="built with"):
        build_bundled_benchmark(folder, query_fraction=0.3, seed=0)


def test_a_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PretraceError, match="holds no bundled benchmark"):
        build_bundled_benchmark(tmp_path)
