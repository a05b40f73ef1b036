"""Influence scores: precondition each query once, then stream documents (or a stored index) through gradient dot products."""

from pretrace.scores.index import IndexSettings, build_index, score_index
from pretrace.scores.pairwise import query_gradients, score_documents, score_weight_sets
from pretrace.scores.result import ScoreResult
from pretrace.scores.self_influence import self_influence
from pretrace.scores.plan import ScoringPlan
from pretrace.scores.queries import PreconditionedQueries, precondition_queries
from pretrace.scores.weights import DenseWeights, EigenbasisWeights, LowRankWeights, ModuleWeights

__all__ = [
    "DenseWeights",
    "EigenbasisWeights",
    "IndexSettings",
    "LowRankWeights",
    "ModuleWeights",
    "PreconditionedQueries",
    "ScoreResult",
    "ScoringPlan",
    "build_index",
    "precondition_queries",
    "query_gradients",
    "score_documents",
    "score_weight_sets",
    "score_index",
    "self_influence",
]
