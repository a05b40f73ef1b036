"""Candidate retrieval (BM25, sentence embeddings) that narrows a corpus before influence scoring."""

from pretrace.retrieval.base import Retriever, make_retriever, retrieval_recall

__all__ = ["Retriever", "make_retriever", "retrieval_recall"]
