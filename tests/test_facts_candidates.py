"""Candidate pools: shared random sentences, ground truth, retrieved top-k and target-sharing negatives."""

import pytest

from pretrace.bench.facts.benchmark import FactBenchmark, Sentence, attach_evidence
from pretrace.bench.facts.candidates import candidate_pools
from pretrace.bench.facts.templates import QuestionTemplate
from pretrace.errors import PretraceError

ALIGNED = {0: ["P36,France,Paris"], 1: ["P36,France,Paris"], 2: ["P1376,Paris,France"], 3: ["P19,Marie,Paris"], 4: ["P19,Victor,Paris"], 5: ["P36,Italy,Rome"]}


@pytest.fixture()
def benchmark():
    sentences = [Sentence(i, f"sentence {i}", tuple(ALIGNED.get(i, ()))) for i in range(10)]
    relations = {"P36": QuestionTemplate("P36", "What is the capital of [X]?"), "P19": QuestionTemplate("P19", "Where was [X] born?"),
                 "P1376": QuestionTemplate("P1376", "What is [X] the capital of?")}
    candidates = [("P36,France,Paris", "France", "P36", "Paris"), ("P36,Italy,Rome", "Italy", "P36", "Rome"), ("P19,Marie,Paris", "Marie", "P19", "Paris")]
    facts, dropped = attach_evidence(sentences, candidates, relations)
    assert dropped == 0
    return FactBenchmark(sentences, facts, relations)


class Retriever:
    def __init__(self, ranking):
        self.ranking, self.calls = ranking, []

    def __call__(self, text, k):
        self.calls.append((text, k))
        return self.ranking[:k]


def test_pool_is_the_union_of_its_parts(benchmark):
    retriever = Retriever([9, 8, 7, 6])
    (pool,) = candidate_pools(benchmark, [benchmark.fact("P36,France,Paris")], retriever, random_count=0, bm25_count=2)
    assert retriever.calls == [("What is the capital of France? Paris", 2)]
    assert pool.ground_truth == (0, 1)
    assert pool.retrieved == (9, 8)
    assert pool.target_sharing == (3, 4)  # other sentences whose facts have the object Paris
    assert pool.ids == (0, 1, 3, 4, 8, 9)


def test_random_part_is_shared_and_negatives_are_capped(benchmark):
    facts = [benchmark.fact("P36,France,Paris"), benchmark.fact("P36,Italy,Rome")]
    pools = candidate_pools(benchmark, facts, Retriever([]), random_count=4, bm25_count=0, sharing_count=1, seed=5)
    assert pools[0].random == pools[1].random and len(set(pools[0].random)) == 4
    assert len(pools[0].target_sharing) == 1 and set(pools[0].target_sharing) <= {3, 4}
    assert pools[1].target_sharing == ()  # Rome is only in its own evidence
    assert set(pools[1].ids) == set(pools[1].random) | {5}
    again = candidate_pools(benchmark, facts[::-1], Retriever([]), random_count=4, bm25_count=0, sharing_count=1, seed=5)
    assert again[::-1] == pools  # seeded per fact: independent of query order


def test_retriever_ids_must_index_the_benchmark(benchmark):
    with pytest.raises(PretraceError, match="outside"):
        candidate_pools(benchmark, [benchmark.fact("P36,Italy,Rome")], Retriever([3, 10]), random_count=0)
