"""What every candidate retriever shares: one `search` signature, a factory, corpus fingerprints and recall.

Influence is too expensive to score a whole pre-training corpus, so a cheap retriever (BM25 or sentence
embeddings) first narrows it to K candidates per query. `retrieval_recall` tells users how many of the
known-relevant documents survived that cut: when it is low, the retriever, not the influence, missed them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from pretrace.errors import PretraceError



@runtime_checkable
class Retriever(Protocol):
    def search(self, query_texts: Sequence[str], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (document indices LongTensor [Q, k], scores float32 [Q, k]), best first."""
        ...


def corpus_sha256(texts: Iterable[str]) -> str:
    """Fingerprint of an ordered corpus, so an index is never reused for different documents."""
    digest = hashlib.sha256()
    for text in texts:
        if not isinstance(text, str):
            raise PretraceError(f"corpus entries must be strings, got {type(text).__name__}; pass document texts.")
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def check_same_corpus(stored_sha256: str, texts: Iterable[str], folder: str | Path) -> None:
    if corpus_sha256(texts) != stored_sha256:
        raise PretraceError(
            f"{folder}: holds an index of a different corpus (documents or their order changed); "
            "choose another index folder or delete this one to rebuild it."
        )


def check_k(k: int, count: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= count:
        raise PretraceError(f"k={k!r} but the corpus has {count} documents; pass an integer k between 1 and {count}.")
    return k


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-first top-k along the last axis; ties go to the lower document index so results are reproducible."""
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return indices[..., :k].long(), values[..., :k].float()


def retrieval_recall(candidates: torch.Tensor | Sequence[Sequence[int]], relevant: Sequence[int | Collection[int]]) -> float:
    """Share of (query, relevant document) pairs whose document is among that query's candidates.

    `candidates[q]` are the K retrieved document indices of query q; `relevant[q]` is one document index
    or a collection of them (queries with none are skipped). Micro-averaged, so a query with three
    relevant documents counts three times.
    """
    rows = candidates.tolist() if isinstance(candidates, torch.Tensor) else [list(row) for row in candidates]
    if len(rows) != len(relevant):
        raise PretraceError(f"{len(rows)} candidate lists but {len(relevant)} relevant sets; pass one per query.")
    found = total = 0
    for row, wanted in zip(rows, relevant):
        wanted = {wanted} if isinstance(wanted, int) else set(wanted)
        found += len(wanted & set(row))
        total += len(wanted)
    if total == 0:
        raise PretraceError("no relevant documents given for any query; recall is undefined.")
    return found / total
