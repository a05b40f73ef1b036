"""Candidate retrieval (BM25, sentence embeddings) that narrows a corpus before influence scoring."""

from pretrace.retrieval.base import Retriever, retrieval_recall
from pretrace.retrieval.make import RETRIEVER_KINDS, make_retriever

__all__ = ["RETRIEVER_KINDS", "Retriever", "make_retriever", "retrieval_recall"]
