"""Fact-tracing metrics of the paper: a method ranks sentences per query; ground truth is the fact's evidence.

MRR: 1 / rank of the first correct sentence within the top `k` (100), 0 when none is there.
Recall@k: the share of the fact's correct sentences found in the top `k` (10); with more than k
correct sentences it cannot reach 1, as in the paper.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from pretrace.errors import PretraceError


def _check(ranked: Sequence[int], correct: Collection[int], k: int) -> None:
    if not correct:
        raise PretraceError("a query has no correct sentences; drop facts without evidence before scoring.")
    if k < 1:
        raise PretraceError(f"k={k}; pass a positive cut-off.")
    if len(set(ranked)) != len(ranked):
        raise PretraceError("a ranking lists a sentence twice; rank each candidate once.")


def reciprocal_rank(ranked: Sequence[int], correct: Collection[int], k: int = 100) -> float:
    _check(ranked, correct, k)
    correct = set(correct)
    for rank, sentence in enumerate(ranked[:k], start=1):
        if sentence in correct:
            return 1.0 / rank
    return 0.0


def recall_at_k(ranked: Sequence[int], correct: Collection[int], k: int = 10) -> float:
    _check(ranked, correct, k)
    correct = set(correct)
    return len(correct.intersection(ranked[:k])) / len(correct)


def _mean(values: list[float]) -> float:
    if not values:
        raise PretraceError("no queries to average over.")
    return sum(values) / len(values)


def _pairs(rankings: Sequence[Sequence[int]], corrects: Sequence[Collection[int]]):
    if len(rankings) != len(corrects):
        raise PretraceError(f"{len(rankings)} rankings but {len(corrects)} ground-truth sets; pass one of each per query.")
    return zip(rankings, corrects)


def mean_reciprocal_rank(rankings: Sequence[Sequence[int]], corrects: Sequence[Collection[int]], k: int = 100) -> float:
    return _mean([reciprocal_rank(r, c, k) for r, c in _pairs(rankings, corrects)])


def mean_recall_at_k(rankings: Sequence[Sequence[int]], corrects: Sequence[Collection[int]], k: int = 10) -> float:
    return _mean([recall_at_k(r, c, k) for r, c in _pairs(rankings, corrects)])
