"""BM25 over word tokens with the maintained `bm25s` library.

Tokens are lowercase words (regex `\\w+`), optionally without English stopwords. The paper's published
script tokenized by characters, which makes BM25 rank on letter counts; words are the standard choice.

Scoring variant: `method="lucene"` (default, as in Lucene/Anserini): idf = log(1 + (N - df + .5) / (df + .5))
is never negative, which matters on small candidate corpora where common words occur in most documents.
`method="robertson"` is the classic Okapi idf log((N - df + .5) / (df + .5)) (clamped at 0), i.e.
rank_bm25's `BM25Okapi` wherever no term occurs in more than half of the documents. bm25s drops
Okapi's constant (k1 + 1) factor, which changes no ranking.

Saved indexes are bm25s' own files (JSON + `.npy` written and read with allow_pickle=False) plus our
`manifest.json` (tokenization, corpus fingerprint).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import bm25s
import numpy as np
import torch
from bm25s.stopwords import STOPWORDS_EN

from pretrace.errors import PretraceError
from pretrace.progress import progress_bar
from pretrace.retrieval.base import check_k, check_same_corpus, corpus_sha256, top_k
from pretrace.storage import atomic_directory, read_json, verify_folder, write_json

WORD_PATTERN = re.compile(r"\w+")
METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")
MANIFEST = "manifest.json"
INDEX_COMMAND = "bm25-index"
FORMAT = "pretrace-bm25"


def tokenize(text: str, stopwords: bool = False) -> list[str]:
    """Lowercase word tokens; with `stopwords`, English function words are dropped."""
    words = WORD_PATTERN.findall(text.lower())
    return [word for word in words if word not in STOPWORDS_EN] if stopwords else words


class BM25Index:
    """A BM25 index over a fixed, ordered corpus; scores and searches free-text queries."""

    def __init__(self, engine: bm25s.BM25, *, count: int, stopwords: bool, corpus_sha256: str):
        self.engine = engine
        self.count = count
        self.stopwords = stopwords
        self.corpus_sha256 = corpus_sha256

    @classmethod
    def build(
        cls,
        texts: Sequence[str],
        *,
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        stopwords: bool = False,
        show_progress: bool = True,
    ) -> BM25Index:
        if method not in METHODS:
            raise PretraceError(f"unknown BM25 method {method!r}; choose one of {', '.join(METHODS)}.")
        if len(texts) == 0:
            raise PretraceError("the corpus is empty; pass at least one document to index.")
        digest = corpus_sha256(texts)
        tokens = [tokenize(text, stopwords) for text in progress_bar(texts, desc="BM25 tokenize", enabled=show_progress)]
        engine = bm25s.BM25(k1=k1, b=b, method=method)
        engine.index(tokens, show_progress=show_progress)
        return cls(engine, count=len(texts), stopwords=stopwords, corpus_sha256=digest)

    def _query_scores(self, query: str) -> np.ndarray:
        ids = self.engine.get_tokens_ids(tokenize(query, self.stopwords))
        if not ids:  # no query word occurs in the corpus: every document scores 0
            return np.zeros(self.count, dtype=np.float32)
        return self.engine.get_scores_from_ids(ids)

    def scores(self, queries: Sequence[str]) -> torch.Tensor:
        """Full score matrix [Q, N] float32 (meant for small corpora; `search` keeps memory at O(N))."""
        rows = [self._query_scores(query) for query in queries]
        return torch.from_numpy(np.stack(rows).astype(np.float32, copy=False)) if rows else torch.zeros(0, self.count)

    def search(self, queries: Sequence[str], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k documents per query: (indices LongTensor [Q, k], scores float32 [Q, k]), best first."""
        check_k(k, self.count)
        indices = torch.empty(len(queries), k, dtype=torch.long)
        values = torch.empty(len(queries), k, dtype=torch.float32)
        for row, query in enumerate(progress_bar(queries, desc="BM25 search", enabled=len(queries) >= 100)):
            indices[row], values[row] = top_k(torch.from_numpy(self._query_scores(query)), k)
        return indices, values

    def save(self, folder: str | Path, overwrite: bool = False) -> None:
        with atomic_directory(folder, INDEX_COMMAND, overwrite=overwrite) as tmp:
            self.engine.save(str(tmp), allow_pickle=False, show_progress=False)
            write_json(
                tmp / MANIFEST,
                {
                    "format": FORMAT,
                    "version": 1,
                    "count": self.count,
                    "corpus_sha256": self.corpus_sha256,
                    "token_pattern": WORD_PATTERN.pattern,
                    "lowercase": True,
                    "stopwords": "bm25s.stopwords.STOPWORDS_EN" if self.stopwords else None,
                    "method": self.engine.method,
                    "k1": self.engine.k1,
                    "b": self.engine.b,
                },
            )

    @classmethod
    def load(cls, folder: str | Path) -> BM25Index:
        folder = Path(folder)
        verify_folder(folder, INDEX_COMMAND, "delete the folder and rebuild the index")
        manifest = read_json(folder / MANIFEST)
        if manifest.get("format") != FORMAT or manifest.get("token_pattern") != WORD_PATTERN.pattern:
            raise PretraceError(f"{folder}: not a pretrace BM25 index of this version; rebuild it.")
        try:
            engine = bm25s.BM25.load(str(folder), allow_pickle=False, load_corpus=False, show_progress=False)
        except (OSError, ValueError, KeyError) as exc:
            raise PretraceError(f"{folder}: unreadable BM25 index ({exc}); delete the folder and rebuild it.") from None
        return cls(engine, count=manifest["count"], stopwords=manifest["stopwords"] is not None,
                   corpus_sha256=manifest["corpus_sha256"])

    @classmethod
    def open_or_build(cls, texts: Sequence[str] | None, folder: str | Path | None, **options) -> BM25Index:
        """Reuse the index saved in `folder` (refusing one of another corpus), else build it and save it there."""
        if folder is not None and (Path(folder) / MANIFEST).is_file():
            index = cls.load(folder)
            if texts is not None:
                check_same_corpus(index.corpus_sha256, texts, folder)
            built = {"method": index.engine.method, "k1": index.engine.k1, "b": index.engine.b, "stopwords": index.stopwords}
            asked = {key: value for key, value in options.items() if key in built}
            differ = sorted(key for key, value in asked.items() if built[key] != value)
            if differ:
                raise PretraceError(f"{folder}: holds a BM25 index built with {', '.join(f'{k}={built[k]!r}' for k in differ)}, not "
                                    f"{', '.join(f'{k}={asked[k]!r}' for k in differ)}; choose another index folder, or the settings it was built with.")
            return index
        if texts is None:
            raise PretraceError(f"{folder}: no saved BM25 index there; pass the corpus texts to build one.")
        index = cls.build(texts, **options)
        if folder is not None:
            index.save(folder)
        return index
