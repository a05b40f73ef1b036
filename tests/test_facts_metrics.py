"""MRR and recall@k on rankings worked out by hand."""

import pytest

from pretrace.bench.facts.metrics import mean_recall_at_k, mean_reciprocal_rank, recall_at_k, reciprocal_rank
from pretrace.errors import PretraceError


def test_reciprocal_rank_is_one_over_the_first_correct_rank_within_k():
    ranked = [7, 3, 9, 4, 1]
    assert reciprocal_rank(ranked, {9, 1}) == pytest.approx(1 / 3)  # 9 is third
    assert reciprocal_rank(ranked, {7}) == 1.0
    assert reciprocal_rank(ranked, {1}, k=4) == 0.0  # 1 is fifth, beyond the cut-off
    assert reciprocal_rank(ranked, {42}) == 0.0


def test_recall_is_the_share_of_correct_sentences_in_the_top_k():
    ranked = list(range(20))
    assert recall_at_k(ranked, {2, 5, 15, 30}) == pytest.approx(2 / 4)  # 2 and 5 in the top 10
    assert recall_at_k(ranked, {2, 5, 15, 30}, k=16) == pytest.approx(3 / 4)
    assert recall_at_k(ranked, set(range(12))) == pytest.approx(10 / 12)  # more correct than k: below 1


def test_means_average_over_queries():
    rankings = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    corrects = [{2}, {4, 6}, {0}]
    assert mean_reciprocal_rank(rankings, corrects) == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert mean_recall_at_k(rankings, corrects, k=2) == pytest.approx((1 + 1 / 2 + 0) / 3)


def test_invalid_inputs_are_rejected():
    with pytest.raises(PretraceError, match="no correct"):
        reciprocal_rank([1, 2], set())
    with pytest.raises(PretraceError, match="twice"):
        recall_at_k([1, 1], {1})
    with pytest.raises(PretraceError, match="one of each"):
        mean_reciprocal_rank([[1]], [{1}, {2}])
