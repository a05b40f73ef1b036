"""Reading documents and queries, and turning them into token batches with loss masks."""

from pretrace.data.records import Document, Fields, Query, iter_documents, iter_queries, read_documents, read_queries
from pretrace.data.batching import TokenBatch, encode_documents, encode_queries, iter_batches

__all__ = [
    "Document",
    "Query",
    "TokenBatch",
    "Fields",
    "encode_documents",
    "encode_queries",
    "iter_batches",
    "iter_documents",
    "iter_queries",
    "read_documents",
    "read_queries",
]
