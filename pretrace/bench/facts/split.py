"""Seeded split of facts into fine-tuning facts and query facts, disjoint by subject.

Whole subjects go to one side, so a query about France is never answered by fine-tuning on another
fact about France: what the model knows about a query's subject came from pre-training.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from pretrace.bench.facts.benchmark import Fact, FactSplit
from pretrace.errors import PretraceError


def split_by_subject(facts: Sequence[Fact], query_fraction: float = 0.2, seed: int = 0) -> FactSplit:
    """About `query_fraction` of the facts (whole subjects, drawn in seeded order) become queries."""
    if not 0.0 < query_fraction < 1.0:
        raise PretraceError(f"query_fraction={query_fraction}; pass a share strictly between 0 and 1.")
    by_subject: dict[str, list[Fact]] = defaultdict(list)
    for fact in facts:
        by_subject[fact.subject_key].append(fact)
    if len(by_subject) < 2:
        raise PretraceError(f"{len(facts)} facts about {len(by_subject)} subject(s); a subject-disjoint split needs at least 2 subjects.")
    subjects = sorted(by_subject)
    random.Random(seed).shuffle(subjects)
    target = max(1, round(query_fraction * len(facts)))
    query_subjects: set[str] = set()
    count = 0
    for subject in subjects[:-1]:  # the last subject always stays for fine-tuning
        if count >= target:
            break
        query_subjects.add(subject)
        count += len(by_subject[subject])
    queries = tuple(f.fact_id for f in facts if f.subject_key in query_subjects)
    finetune = tuple(f.fact_id for f in facts if f.subject_key not in query_subjects)
    return FactSplit(finetune, queries, seed, query_fraction)
