"""The one factory of the candidate retrievers: BM25 in memory or saved, sentence embeddings on disk."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pretrace.errors import PretraceError
from pretrace.retrieval.base import Retriever

RETRIEVER_KINDS = ("bm25", "embedding")


def make_retriever(
    kind: str,
    texts: Sequence[str] | None = None,
    *,
    folder: str | Path | None = None,
    model: str | Path | None = None,
    **options,
) -> Retriever:
    """Build (or reopen from `folder`) a retriever of `kind` over `texts`.

    bm25: built in memory; saved to / reloaded from `folder` when one is given.
    embedding: always disk-backed in `folder` (resumable); `model` is a sentence-transformers folder.
    `options` go to the index's `build` (e.g. k1, b, method, stopwords / chunk_size, batch_size).
    """
    if kind not in RETRIEVER_KINDS:
        raise PretraceError(f"unknown retriever {kind!r}; choose one of {', '.join(RETRIEVER_KINDS)}.")
    if texts is None and folder is None:
        raise PretraceError(f"{kind} retriever: pass the corpus texts or the folder of a saved index.")
    if kind == "bm25":
        from pretrace.retrieval.bm25 import BM25Index

        if model is not None:
            raise PretraceError("a model applies only to the embedding retriever; drop it for bm25.")
        return BM25Index.open_or_build(texts, folder, **options)

    from pretrace.retrieval.embedding import EmbeddingIndex

    if folder is None:
        raise PretraceError("the embedding retriever stores its vectors on disk; pass an index folder.")
    if texts is None:
        return EmbeddingIndex.open(folder, model=model, **options)
    return EmbeddingIndex.build(texts, folder, model=model, **options)
