"""Building the compressed corpus store: every document's gradient sketched once (see `gradients.sketch`), in
float16 shards written as signed parts (a killed build resumes after its last whole shard), then the search index.

The store is a `pretrace index` folder (`--storage sketch`): `index.json` (the signature, the sketch, the shards,
the document ids, the bytes per document), `shard-NNNNN.safetensors` (`vectors`: float16 `[documents, width]`) and,
for quantised search, `search.faiss`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from pretrace.config import to_dict
from pretrace.data.batching import TokenBatch
from pretrace.errors import PretraceError
from pretrace.gradients.sketch import KroneckerSketch
from pretrace.gradients.source import LiveGradients, document_loss
from pretrace.gradients.task import LanguageModelingTask, Task
from pretrace.modeling.modules import TrackedModule
from pretrace.progress import progress_bar
from pretrace.scores.index import FORMAT_VERSION, INDEX_FILE, IndexSettings, chunks
from pretrace.storage import RowFile, SignedParts, file_sha256, read_record, write_record
from pretrace.curvature.factors import Factors
from pretrace.store.search import SEARCH_FILE, SKETCH_PART, build_search

QUANTISED_FROM = 100_000  # documents from which --search auto encodes product-quantised codes
WHITENING_DAMPING = 0.1  # γ of each whitening factor, relative to its mean eigenvalue


def curvature_whitening(factors: Factors, relative: float = WHITENING_DAMPING) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, the Kronecker factors (S + γ_S, A + γ_A) of the curvature the documents' gradients live in
    (γ: `relative` × the factor's mean eigenvalue), for `KroneckerSketch`'s whitening. A module with per-head output
    blocks keeps an unwhitened output side (identity)."""
    whitening = {}
    for name, module in factors.modules.items():
        values, vectors = module.activation_eigenvalues.double(), module.activation_eigenvectors.double()
        inputs = (vectors * (values + relative * values.mean())) @ vectors.T
        if module.n_blocks == 1:
            values, vectors = module.gradient_eigenvalues[0].double(), module.gradient_eigenvectors[0].double()
            outputs = (vectors * (values + relative * values.mean())) @ vectors.T
        else:
            outputs = torch.eye(module.n_blocks * module.gradient_eigenvalues.shape[1], dtype=torch.float64)
        whitening[name] = (outputs, inputs)
    return whitening


def build_store(model: torch.nn.Module, tracked: list[TrackedModule], batches: Iterable[TokenBatch], folder: str | Path,
                settings: IndexSettings, signature: dict | None = None, task: Task | None = None, num_batches: int | None = None,
                progress: bool = True, whitening: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict:
    """Write (or resume) the store of every document's sketched loss gradient in `folder`; returns its metadata.
    `whitening`: see `KroneckerSketch` (`curvature_whitening` of the document model's factors); the signature must
    then name those factors."""
    folder, task = Path(folder), task or LanguageModelingTask()
    shapes = {t.name: [t.d_out, t.d_in_total] for t in tracked}
    signature = json_ready({"settings": to_dict(settings), "modules": shapes, **(signature or {})})
    if (folder / INDEX_FILE).is_file():
        meta = read_record(folder / INDEX_FILE, "rebuild the store with `pretrace index --storage sketch`")
        if meta.get("signature") != signature:
            raise PretraceError(f"{folder}: holds a store of other documents, model or settings; choose another folder or delete it.")
        return meta
    sketch = KroneckerSketch({name: tuple(sides) for name, sides in shapes.items()}, settings.sketch_dim, settings.sketch_seed, whitening)
    parts = SignedParts(folder, signature, "corpus store build (other documents, model, factors or settings)")
    parts.save(SKETCH_PART, sketch.query_tensors())  # what sketches a query, without the factors
    shards, ids = _write_shards(model, tracked, batches, parts, sketch, settings, task, num_batches, progress)
    if not ids:
        raise PretraceError("no documents to index.")
    search = settings.search if settings.search != "auto" else ("pq" if len(ids) >= QUANTISED_FROM else "flat")
    vectors = [RowFile(folder / shard["file"], "vectors") for shard in shards]
    described = build_search(vectors, folder / SEARCH_FILE, progress) if search == "pq" else {"kind": "flat"}
    if search == "pq":
        described["sha256"] = file_sha256(folder / SEARCH_FILE)
    meta = {"format_version": FORMAT_VERSION, "signature": signature, "complete": True, "storage": "sketch", "modules": shapes,
            "sketch": {"dim": settings.sketch_dim, "seed": settings.sketch_seed, "width": sketch.width, "normalized": settings.normalize,
                       "whitened": whitening is not None},
            "bytes_per_document": 2 * sketch.width, "search": described, "shards": shards, "document_ids": ids}
    write_record(folder / INDEX_FILE, meta)
    return meta


def _write_shards(model, tracked, batches, parts: SignedParts, sketch: KroneckerSketch, settings: IndexSettings, task: Task,
                  num_batches: int | None, progress: bool) -> tuple[list[dict], list[str]]:
    """Every shard (kept from an interrupted build when whole, else sketched now): their entries and the document
    ids."""
    total = None if num_batches is None else -(-num_batches // settings.shard_batches)
    shards, ids = [], []
    source = LiveGradients(model, tracked, batches, document_loss(task))
    for number, chunk in enumerate(progress_bar(chunks(source, settings.shard_batches), total=total, desc="sketching documents", unit="shard", enabled=progress)):
        name, chunk_ids = f"shard-{number:05d}", [i for gradients in chunk for i in gradients.ids]
        if parts.load(name, "the shard is sketched again") is None:
            vectors = torch.cat([_sketched(gradients, sketch, settings.normalize) for gradients in chunk])
            parts.save(name, {"vectors": vectors}, documents=len(chunk_ids))
        shards.append({"file": parts.path(name).name, "documents": len(chunk_ids)})
        ids.extend(chunk_ids)
    return shards, ids


def _sketched(gradients, sketch: KroneckerSketch, normalize: bool) -> torch.Tensor:
    """A batch's float16 sketches (unit norm with `normalize`; a document without a loss keeps its zero vector)."""
    vectors = sketch.documents(gradients.captured)
    gradients.release()
    if normalize:
        vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(torch.finfo(vectors.dtype).tiny)
    if vectors.numel() and not (bool(torch.isfinite(vectors).all()) and float(vectors.abs().max()) <= torch.finfo(torch.float16).max):
        raise PretraceError("a document's gradient sketch is not finite in float16 (beyond 65504); use --normalize, or a smaller --sketch-dim.")
    return vectors.to(torch.float16).cpu()


def json_ready(value: dict) -> dict:
    """The signature as JSON gives it back (tuples as lists), so a resumed build compares equal."""
    return json.loads(json.dumps(value, default=str))
