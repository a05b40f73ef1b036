"""The fine-tuning / query split: seeded, disjoint by subject, close to the asked share."""

import pytest

from pretrace.bench.facts.benchmark import Fact
from pretrace.bench.facts.split import split_by_subject
from pretrace.errors import PretraceError


def _facts():
    facts = []
    for s in range(20):
        for o in range(s % 3 + 1):
            facts.append(Fact(f"P1,S{s},O{o}", f"S{s}", "P1", f"O{o}", f"q {s}?", (0,)))
    return facts


def test_split_is_subject_disjoint_complete_and_seeded():
    facts = _facts()
    split = split_by_subject(facts, query_fraction=0.25, seed=1)
    assert sorted(split.finetune + split.queries) == sorted(f.fact_id for f in facts)
    subjects = lambda ids: {i.split(",")[1] for i in ids}
    assert not subjects(split.finetune) & subjects(split.queries)
    assert 0.25 * len(facts) <= len(split.queries) < 0.25 * len(facts) + 3  # whole subjects: overshoot < one subject
    assert split_by_subject(facts, 0.25, seed=1) == split
    assert split_by_subject(facts, 0.25, seed=2).queries != split.queries


def test_split_rejects_impossible_requests():
    with pytest.raises(PretraceError, match="between 0 and 1"):
        split_by_subject(_facts(), query_fraction=1.0)
    with pytest.raises(PretraceError, match="at least 2 subjects"):
        split_by_subject(_facts()[:1])
