"""Fact tracing (the paper's multi-stage benchmark): which pre-training sentences taught a fine-tuned
model a fact? Ground truth is the sentences aligned to the fact; methods rank candidate pools; MRR and
recall@10 score the rankings. Real T-REx/LAMA files load with `trex_lama`; `bundled` builds the same kind
of benchmark from packages that install offline.
"""

from pretrace.bench.facts.benchmark import Fact, FactBenchmark, FactSplit, Sentence, fact_key, read_benchmark, split_fact_key
from pretrace.bench.facts.bundled import build_bundled_benchmark, bundled_stats, make_bundled_benchmark
from pretrace.bench.facts.candidates import CandidatePool, candidate_pools
from pretrace.bench.facts.metrics import mean_recall_at_k, mean_reciprocal_rank, recall_at_k, reciprocal_rank
from pretrace.bench.facts.split import split_by_subject
from pretrace.bench.facts.templates import QuestionTemplate, format_prompt, read_question_templates
from pretrace.bench.facts.trex_lama import build_trex_lama_benchmark, read_lama_evidences, read_lama_facts, read_lama_relations

__all__ = [
    "CandidatePool",
    "Fact",
    "FactBenchmark",
    "FactSplit",
    "QuestionTemplate",
    "Sentence",
    "build_bundled_benchmark",
    "build_trex_lama_benchmark",
    "bundled_stats",
    "candidate_pools",
    "fact_key",
    "format_prompt",
    "make_bundled_benchmark",
    "mean_recall_at_k",
    "mean_reciprocal_rank",
    "read_benchmark",
    "read_lama_evidences",
    "read_lama_facts",
    "read_lama_relations",
    "read_question_templates",
    "recall_at_k",
    "reciprocal_rank",
    "split_by_subject",
    "split_fact_key",
]
