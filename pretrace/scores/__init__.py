"""Influence scores: precondition each query once, then stream documents through gradient dot products."""

from pretrace.scores.pairwise import ScoreResult, query_gradients, score_documents, self_influence

__all__ = ["ScoreResult", "query_gradients", "score_documents", "self_influence"]
