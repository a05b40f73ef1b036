"""Searching the corpus store: the highest sketched scores ⟨query sketch, document sketch⟩ for each query.

`flat` search streams the float16 shards in blocks (exact; the store is never held in RAM). `pq`
search scans every document's product-quantised code (faiss, inner-product metric, one byte per four dimensions:
1/8 of the store, held in RAM) for each query's candidates and re-scores them exactly from the shards. An
inverted-file index was measured first and dropped: sketched gradients' large-norm documents, which hold the top
inner products, fall in lists whose centroids score low, so probing half of 1,000 lists of a million documents
still found only 59% of the exact top 100.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy
import torch

from pretrace.errors import PretraceError
from pretrace.extras import require
from pretrace.gradients.sketch import KroneckerSketch
from pretrace.progress import progress_bar
from pretrace.scores.result import ScoreResult
from pretrace.scores.weights import as_module_weights
from pretrace.storage import RowFile, read_record, read_sealed, verify_folder

SEARCH_FILE = "search.faiss"
SKETCH_PART = "sketch"  # sketch.safetensors: the query side's projections (whitened, when the store is)
BLOCK = 65_536  # documents converted to float32 at a time by flat search and the index build
TRAINING = 65_536  # sketches the product quantisers are trained on (faiss wants 39 per centroid: 256 centroids each)
CANDIDATES = 50_000  # per query, re-scored exactly: the fewest of 1k-50k whose recall@100 reached 0.95 on the 1M benchmark's dev queries


def _faiss():
    require("faiss", purpose="--search pq", alternative=" (or choose --search flat)")
    import faiss

    return faiss


def _blocks(vectors: list[numpy.ndarray]):
    """(first row, float16 block) over the shards in order, BLOCK rows at a time."""
    offset = 0
    for shard in vectors:
        for start in range(0, len(shard), BLOCK):
            yield offset + start, shard[start:start + BLOCK]
        offset += len(shard)


def build_search(vectors: list[numpy.ndarray], path: Path, progress: bool) -> dict:
    """Train product quantisers on a sample of the sketches (up to TRAINING of them) and encode every document;
    written to `path` atomically."""
    faiss = _faiss()
    start = time.perf_counter()
    total, width = sum(len(v) for v in vectors), vectors[0].shape[1]
    sample = numpy.sort(numpy.random.default_rng(0).choice(total, size=min(total, TRAINING), replace=False))
    starts = numpy.cumsum([0] + [len(v) for v in vectors])
    training = numpy.concatenate([vectors[s][sample[(sample >= starts[s]) & (sample < starts[s + 1])] - starts[s]] for s in range(len(vectors))])
    codes = next(m for m in range(max(1, width // 4), 0, -1) if width % m == 0)  # sub-quantisers: about four dimensions each
    index = faiss.IndexPQ(width, codes, 8, faiss.METRIC_INNER_PRODUCT)
    index.train(numpy.ascontiguousarray(training, dtype=numpy.float32))
    for _, block in progress_bar(list(_blocks(vectors)), desc="encoding sketches", unit="block", enabled=progress):
        index.add(numpy.ascontiguousarray(block, dtype=numpy.float32))
    temporary = path.with_name(f".{path.name}.tmp")
    faiss.write_index(index, str(temporary))
    os.replace(temporary, path)
    return {"kind": "pq", "trained_on": len(sample), "codes_bytes_per_document": codes, "seconds": time.perf_counter() - start}


class CorpusStore:
    """A built store, opened read-only: its shards read by rows on demand, its search index (if any) loaded.

    `verify`: check every file against the folder's manifest first (reads the whole store once)."""

    def __init__(self, folder: str | Path, verify: bool = True):
        self.folder = Path(folder)
        if verify:
            verify_folder(self.folder, "index", "rebuild the store with `pretrace index --storage sketch`")
        self.meta = read_record(self.folder / "index.json", "rebuild the store with `pretrace index --storage sketch`")
        if self.meta.get("storage") != "sketch":
            raise PretraceError(f"{self.folder}: a gradient index of --storage {self.meta.get('storage')}, not a corpus store (--storage sketch).")
        self.vectors = [RowFile(self.folder / shard["file"], "vectors") for shard in self.meta["shards"]]
        self.document_ids: list[str] = self.meta["document_ids"]
        self.index = _faiss().read_index(str(self.folder / SEARCH_FILE)) if self.meta["search"]["kind"] == "pq" else None

    def __len__(self) -> int:
        return len(self.document_ids)

    def sketch(self, weights: dict) -> torch.Tensor:
        """`[Q, width]` sketches of preconditioned query weights (per module, any `ModuleWeights` or dense tensor), by
        the projections the store was built with: a query's sketched score against a document estimates its exact one."""
        modules = self.meta["modules"]
        missing = [name for name in modules if name not in weights]
        if missing:
            raise PretraceError(f"{self.folder}: stores modules the queries lack ({', '.join(missing[:3])}); use the --preset and --modules of `pretrace index`.")
        sketch = KroneckerSketch.for_queries(list(modules), read_sealed(self.folder / f"{SKETCH_PART}.safetensors")[0])
        return sketch.weights({name: as_module_weights(weights[name]).settle(None).dense() for name in modules})

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """`[Q, N]` float64 sketched scores of every document."""
        q = queries.double().numpy()
        return torch.from_numpy(numpy.concatenate([q @ numpy.asarray(block, dtype=numpy.float64).T for _, block in _blocks(self.vectors)], axis=1))

    def score_result(self, weights: dict, query_ids: list[str]) -> ScoreResult:
        """The sketched scores of every document for these preconditioned query weights, as a `ScoreResult`."""
        start = time.perf_counter()
        scores = self.scores(self.sketch(weights))
        return ScoreResult(scores, list(query_ids), list(self.document_ids), list(self.meta["modules"]),
                           timings={"documents_seconds": time.perf_counter() - start})

    def rows(self, indices: numpy.ndarray) -> numpy.ndarray:
        """The sketches of documents `indices` (any order), float32."""
        starts = numpy.cumsum([0] + [len(v) for v in self.vectors])
        shard = numpy.searchsorted(starts, indices, side="right") - 1
        out = numpy.empty((len(indices), self.vectors[0].shape[1]), dtype=numpy.float32)
        for s in numpy.unique(shard):
            chosen = shard == s
            out[chosen] = self.vectors[s][indices[chosen] - starts[s]]
        return out

    def exact_top(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's `k` highest sketched scores and their document indices, by streaming every block."""
        q = queries.float().numpy()
        best_scores = torch.full((len(q), 0), float("-inf"))
        best_indices = torch.zeros((len(q), 0), dtype=torch.int64)
        for first, block in _blocks(self.vectors):
            scores = torch.from_numpy(q @ numpy.asarray(block, dtype=numpy.float32).T)
            merged = torch.cat([best_scores, scores], dim=1)
            indices = torch.cat([best_indices, torch.arange(first, first + scores.shape[1]).expand(len(q), -1)], dim=1)
            keep = torch.topk(merged, min(k, merged.shape[1]), dim=1)
            best_scores, best_indices = keep.values, indices.gather(1, keep.indices)
        return best_scores, best_indices

    def search(self, queries: torch.Tensor, k: int, candidates: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's top `k` (scores, document indices): exact over the store (flat), or the `candidates`
        (default max(CANDIDATES, 10k)) best by product-quantised codes, re-scored exactly from the shards."""
        if self.index is None:
            return self.exact_top(queries, k)
        candidates = min(len(self), max(k, candidates or max(CANDIDATES, 10 * k)))
        q = queries.float().numpy()
        _, found = self.index.search(numpy.ascontiguousarray(q), candidates)
        top_scores, top_indices = [], []
        for row, query in zip(found, q):
            keep = torch.topk(torch.from_numpy(self.rows(row) @ query), min(k, len(row)))
            top_scores.append(keep.values)
            top_indices.append(torch.from_numpy(row)[keep.indices])
        return torch.stack(top_scores), torch.stack(top_indices)
