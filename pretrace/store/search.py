"""Searching the corpus store: the highest sketched scores ⟨query sketch, document sketch⟩ for each query.

`flat` search streams the memory-mapped float16 shards in blocks (exact; the store is never held in RAM). `ivf`
search asks a faiss inverted-file index (inner-product metric, product-quantised codes of one byte per eight
dimensions: 1/16 of the store) for candidates and re-scores them exactly from the shards.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy
import torch
from tqdm.auto import tqdm

from pretrace.errors import PretraceError
from pretrace.gradients.sketch import KroneckerSketch
from pretrace.scores.result import ScoreResult
from pretrace.scores.weights import as_module_weights
from pretrace.storage import memory_map, read_record, read_sealed, verify_folder

SEARCH_FILE = "search.faiss"
SKETCH_PART = "sketch"  # sketch.safetensors: the query side's projections (whitened, when the store is)
BLOCK = 65_536  # documents converted to float32 at a time by flat search and the index build


def _faiss():
    try:
        import faiss
    except ImportError:
        raise PretraceError("--search ivf needs faiss: pip install 'pretrace[index]' (or choose --search flat).") from None
    return faiss


def _blocks(vectors: list[numpy.ndarray]):
    """(first row, float16 block) over the shards in order, BLOCK rows at a time."""
    offset = 0
    for shard in vectors:
        for start in range(0, len(shard), BLOCK):
            yield offset + start, shard[start:start + BLOCK]
        offset += len(shard)


def build_search(vectors: list[numpy.ndarray], path: Path, progress: bool) -> dict:
    """Train and fill an inverted-file index of product-quantised sketches; written to `path` atomically. About √N
    lists (at least 39 training points each), trained on up to 64 points per list (k-means costs points × lists ×
    width: this keeps a million documents' training to minutes on two cores)."""
    faiss = _faiss()
    total, width = sum(len(v) for v in vectors), vectors[0].shape[1]
    lists = max(1, min(int(total ** 0.5), total // 39))
    rng = numpy.random.default_rng(0)
    sample = numpy.sort(rng.choice(total, size=min(total, max(64 * lists, 256 * 40)), replace=False))
    starts = numpy.cumsum([0] + [len(v) for v in vectors])
    training = numpy.concatenate([vectors[s][sample[(sample >= starts[s]) & (sample < starts[s + 1])] - starts[s]] for s in range(len(vectors))])
    codes = next(m for m in range(max(1, width // 8), 0, -1) if width % m == 0)  # sub-quantisers: about eight dimensions each
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(width), width, lists, codes, 8, faiss.METRIC_INNER_PRODUCT)
    index.train(numpy.ascontiguousarray(training, dtype=numpy.float32))
    for _, block in tqdm(list(_blocks(vectors)), desc="indexing sketches", unit="block", disable=not progress):
        index.add(numpy.ascontiguousarray(block, dtype=numpy.float32))
    temporary = path.with_name(f".{path.name}.tmp")
    faiss.write_index(index, str(temporary))
    os.replace(temporary, path)
    return {"kind": "ivf", "lists": lists, "trained_on": len(sample), "codes_bytes_per_document": codes}


class CorpusStore:
    """A built store, opened read-only: its shards memory-mapped, its search index (if any) loaded.

    `verify`: check every file against the folder's manifest first (reads the whole store once)."""

    def __init__(self, folder: str | Path, verify: bool = True):
        self.folder = Path(folder)
        if verify:
            verify_folder(self.folder, "index", "rebuild the store with `pretrace index --storage sketch`")
        self.meta = read_record(self.folder / "index.json", "rebuild the store with `pretrace index --storage sketch`")
        if self.meta.get("storage") != "sketch":
            raise PretraceError(f"{self.folder}: a gradient index of --storage {self.meta.get('storage')}, not a corpus store (--storage sketch).")
        self.vectors = [memory_map(self.folder / shard["file"], "vectors") for shard in self.meta["shards"]]
        self.document_ids: list[str] = self.meta["document_ids"]
        self.index = _faiss().read_index(str(self.folder / SEARCH_FILE)) if self.meta["search"]["kind"] == "ivf" else None

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

    def search(self, queries: torch.Tensor, k: int, candidates: int | None = None, probes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's top `k` (scores, document indices): exact over the store (flat), or from the inverted-file
        index's `candidates` nearest (default max(10k, 1000)) over `probes` lists (default 1/16 of them), re-scored
        exactly from the shards."""
        if self.index is None:
            return self.exact_top(queries, k)
        candidates = min(len(self), candidates or max(10 * k, 1000))
        self.index.nprobe = probes or max(1, self.meta["search"]["lists"] // 16)
        q = queries.float().numpy()
        _, found = self.index.search(numpy.ascontiguousarray(q), candidates)
        top_scores, top_indices = [], []
        k = min(k, len(self))
        for number, (row, query) in enumerate(zip(found, q)):
            row = row[row >= 0]
            if len(row) < k:  # the lists probed hold fewer documents than asked: this query is searched exactly
                scores, indices = self.exact_top(queries[number:number + 1], k)
                top_scores.append(scores[0])
                top_indices.append(indices[0])
                continue
            exact = torch.from_numpy(self.rows(row) @ query)
            keep = torch.topk(exact, min(k, len(row)))
            top_scores.append(keep.values)
            top_indices.append(torch.from_numpy(row)[keep.indices])
        return torch.stack(top_scores), torch.stack(top_indices)
