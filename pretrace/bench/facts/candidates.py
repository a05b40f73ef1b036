"""Per-query candidate pools: influence is too costly over the whole attribution set, so each query's
sentences are ranked within a pool, as in the paper:

- `random_count` random sentences, the same for every query (easy negatives, seeded);
- every ground-truth sentence of the query's fact (so MRR / recall measure the ranking, not the pool);
- the top `bm25_count` sentences of a lexical retriever for the question plus its answer;
- up to `sharing_count` other sentences with a fact of the same object (hard negatives: they teach the
  same answer to a different question), drawn with a seed derived from the fact so pools do not depend
  on query order.

The retriever is any `rank_fn(query_text, k) -> sentence ids`, e.g. a BM25 index's search.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pretrace.bench.facts.benchmark import Fact, FactBenchmark
from pretrace.errors import PretraceError

RankFn = Callable[[str, int], Sequence[int]]


@dataclass(frozen=True)
class CandidatePool:
    fact_id: str
    ids: tuple[int, ...]  # sorted union of the parts below
    random: tuple[int, ...]
    ground_truth: tuple[int, ...]
    retrieved: tuple[int, ...]
    target_sharing: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"fact_id": self.fact_id, "ids": list(self.ids), "random": list(self.random), "ground_truth": list(self.ground_truth),
                "retrieved": list(self.retrieved), "target_sharing": list(self.target_sharing)}


def candidate_pools(
    benchmark: FactBenchmark,
    facts: Sequence[Fact],
    rank_fn: RankFn,
    *,
    random_count: int = 200,
    bm25_count: int = 100,
    sharing_count: int = 100,
    seed: int = 0,
) -> list[CandidatePool]:
    size = len(benchmark.sentences)
    if min(random_count, bm25_count, sharing_count) < 0:
        raise PretraceError("candidate counts must be non-negative.")
    shared_random = tuple(sorted(random.Random(seed).sample(range(size), min(random_count, size))))
    sharing = benchmark.target_sharing_ids()
    pools = []
    for fact in facts:
        truth = set(fact.evidence_ids)
        retrieved = tuple(_checked_ids(rank_fn(fact.retrieval_query, min(bm25_count, size)), size, fact)[:bm25_count]) if bm25_count else ()
        negatives = [i for i in sharing.get(fact.object_key, ()) if i not in truth]
        if len(negatives) > sharing_count:
            negatives = sorted(random.Random(f"{seed}|{fact.fact_id}").sample(negatives, sharing_count))
        ids = tuple(sorted(set(shared_random) | truth | set(retrieved) | set(negatives)))
        pools.append(CandidatePool(fact.fact_id, ids, shared_random, tuple(sorted(truth)), retrieved, tuple(negatives)))
    return pools


def _checked_ids(ids: Sequence[int], size: int, fact: Fact) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < size]
    if bad:
        raise PretraceError(f"rank_fn returned sentence ids {bad[:3]} for fact {fact.fact_id!r}, outside 0..{size - 1}; it must rank this benchmark's sentences.")
    return ids
