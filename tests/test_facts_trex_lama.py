"""The T-REx / LAMA loaders on small files in the real formats (tests/fixtures/facts)."""

import json
from pathlib import Path

import pytest

from pretrace.config import from_flags
from pretrace.bench.facts.benchmark import FactSplit, read_benchmark
from pretrace.bench.facts.templates import read_question_templates
from pretrace.bench.facts.trex_lama import (
    build_trex_lama_benchmark,
    iter_trex_documents,
    read_lama_facts,
    read_lama_relations,
    trex_files,
    trex_sentences,
)
from pretrace.errors import PretraceError

FIXTURES = Path(__file__).parent / "fixtures" / "facts"
TREX = FIXTURES / "trex"
LAMA = FIXTURES / "lama"


@pytest.fixture(scope="module")
def built():
    return build_trex_lama_benchmark(TREX, LAMA / "TREx", LAMA / "bloom_questions.jsonl")


def test_files_are_read_in_numeric_order_of_their_start_index():
    assert [f.name for f in trex_files(TREX)] == ["re-nlg_0-10000.json", "re-nlg_20000-30000.json", "re-nlg_100000-110000.json"]


def test_all_sentences_with_entity_triples_keep_every_entity_fact_once():
    sentences, left_out = trex_sentences(iter_trex_documents(TREX))
    assert left_out == 0  # no fact required
    assert [(s.text, s.facts) for s in sentences] == [
        ("Paris is the capital and most populous city of France.", ("P1376,Q90,Q142", "P36,Q142,Q90", "P17,Q90,Q142")),
        ("The city is located on the Seine.", ("P206,Q90,Q1471",)),
        # "Paris hosted the 1900 Summer Olympics." has only a date triple: no entity fact, no record
        ("Marie Curie was a Polish and naturalised-French physicist and chemist.", ("P27,Q7186,Q36",)),
        ("She was born in Warsaw.", ("P19,Q7186,Q270",)),  # two aligners, one fact
        ("Curie died in 1934 in Passy, France.", ("P20,Q7186,Q1093371",)),
        ("Warsaw is the capital of Poland.", ("P36,Q36,Q270", "P1376,Q270,Q36")),
        ("Marie Curie was born in Warsaw in 1867.", ("P19,Q7186,Q270",)),
    ]
    assert [s.id for s in sentences] == list(range(7))
    assert sentences[3].source == "http://www.wikidata.org/entity/Q7186#1"


def test_lama_files_and_templates_are_parsed():
    facts = read_lama_facts(LAMA / "TREx")
    assert [f.key for f in facts] == ["P1376,Q90,Q142", "P1376,Q270,Q36", "P19,Q7186,Q270", "P19,Q937,Q3012", "P36,Q142,Q90", "P36,Q36,Q270"]
    assert (facts[2].subject_label, facts[2].object_label) == ("Marie Curie", "Warsaw")
    relations = read_lama_relations(LAMA / "relations.jsonl")
    assert relations["P19"].template == "[X] was born in [Y] ." and relations["P36"].type == "1-1"
    questions = read_question_templates(LAMA / "bloom_questions.jsonl")
    assert questions["P19"].ask("Marie Curie") == "Where was Marie Curie born?"


def test_attribution_set_keeps_sentences_with_a_lama_fact_and_maps_facts_to_them(built):
    benchmark, counts = built
    assert [s.text for s in benchmark.sentences] == [
        "Paris is the capital and most populous city of France.",
        "She was born in Warsaw.",
        "Warsaw is the capital of Poland.",
        "Marie Curie was born in Warsaw in 1867.",
    ]
    assert benchmark.fact_to_ids() == {
        "P1376,Q90,Q142": [0],
        "P1376,Q270,Q36": [2],
        "P19,Q7186,Q270": [1, 3],
        "P36,Q142,Q90": [0],
        "P36,Q36,Q270": [2],
    }
    # Einstein/Ulm is in no sentence; the Seine, Curie's nationality and her death place are no LAMA fact
    assert counts == {"lama_facts": 6, "facts_without_evidence": 1, "facts": 5, "sentences": 4, "sentences_without_lama_fact": 3}
    assert benchmark.target_sharing_ids() == {"Q142": [0], "Q90": [0], "Q270": [1, 2, 3], "Q36": [2]}
    assert sorted(benchmark.relations) == ["P1376", "P19", "P36"]


def test_facts_become_questions_with_the_object_as_completion(built):
    fact = built[0].fact("P19,Q7186,Q270")
    assert fact.prompt == "Question: Where was Marie Curie born?\nAnswer:"
    assert fact.completion == " Warsaw"
    assert fact.retrieval_query == "Where was Marie Curie born? Warsaw"


def test_benchmark_round_trips_through_its_folder(built, tmp_path):
    benchmark = built[0]
    benchmark.split = FactSplit(("P36,Q142,Q90",), ("P19,Q7186,Q270",), seed=3, query_fraction=0.5)
    try:
        benchmark.write(tmp_path)
    finally:
        benchmark.split = None
    again = read_benchmark(tmp_path)
    assert again.sentences == benchmark.sentences and again.facts == benchmark.facts and again.relations == benchmark.relations
    assert [f.fact_id for f in again.query_facts()] == ["P19,Q7186,Q270"]
    queries = [json.loads(line) for line in (tmp_path / "queries.jsonl").read_text().splitlines()]
    assert queries == [{"id": "P19,Q7186,Q270", "prompt": "Question: Where was Marie Curie born?\nAnswer:", "completion": " Warsaw"}]


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(PretraceError, match="no such file or folder"):
        trex_files(tmp_path / "missing")
    (tmp_path / "re-nlg_0-1.json").write_text(json.dumps([{"text": "x"}]))
    with pytest.raises(PretraceError, match="lacks"):
        list(iter_trex_documents(tmp_path))
    with pytest.raises(PretraceError, match="P\\*.jsonl"):
        read_lama_facts(tmp_path)
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"relation": "P19", "question": "Where was he born?"}) + "\n")
    with pytest.raises(PretraceError, match=r"\[X\]"):
        read_question_templates(questions)
    questions.write_text(json.dumps({"relation": "P36", "question": "Capital of [X]?"}) + "\n")
    with pytest.raises(PretraceError, match="no question template"):
        build_trex_lama_benchmark(TREX, LAMA / "TREx", questions)


LAMA_RELATIONS = ("P1001 P101 P103 P106 P108 P127 P1303 P131 P136 P1376 P138 P140 P1412 P159 P17 P176 P178 P19 P190 P20 P264 "
                  "P27 P276 P279 P30 P31 P36 P361 P364 P37 P39 P407 P413 P449 P463 P47 P495 P527 P530 P740 P937").split()


def test_shipped_questions_cover_every_lama_relation_and_are_the_default(tmp_path, capsys):
    from pretrace.bench.facts.run import FactTracingSettings, _Run
    from pretrace.bench.facts.trex_lama import shipped_questions

    shipped = read_question_templates(shipped_questions())
    assert sorted(shipped) == sorted(LAMA_RELATIONS)
    assert shipped["P19"].ask("Marie Curie") == "Where was Marie Curie born?"
    run = _Run(from_flags(FactTracingSettings, out=str(tmp_path / "out"), data="trex-lama", trex=str(TREX), lama=str(LAMA / "TREx")))
    benchmark, build = run.benchmark()
    assert build["facts_without_evidence"] == 1 and build["sentences_without_lama_fact"] == 3
    assert json.loads((tmp_path / "out" / "benchmark" / "build.json").read_text()) == build
    printed = capsys.readouterr().out
    assert "1 of 6 LAMA facts dropped" in printed and "3 T-REx sentences dropped" in printed
