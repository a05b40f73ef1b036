"""A gradient index: document gradients computed once, so each new query costs one backward pass plus
a matrix product over the index.

A folder holds `index.json` (settings, the model's fingerprint, the documents' hash, module shapes,
document ids) and `shard-NNNNN.safetensors` files of consecutive document batches, each a signed part
(`storage.SignedParts`): an interrupted build resumes after its last complete shard. Per module and document it stores
- `exact`: the gradient `[d_out, d_in']` (scores equal the streaming path's to float rounding);
- `factored`: the document's token factors (output gradients `[T, d_out]`, inputs `[T, d_in']`), also
  exact, smaller than `exact` while documents are shorter than d_out·d_in' / (d_out + d_in');
The compressed corpus store for large corpora (`--storage sketch`, `pretrace.store`) is built by the same
command.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

import torch

from pretrace.config import to_dict
from pretrace.data.batching import TokenBatch
from pretrace.data.records import source_sha256
from pretrace.errors import PretraceError
from pretrace.gradients.capture import CapturedBatch, compute_dtype
from pretrace.gradients.source import LiveGradients, document_loss
from pretrace.gradients.task import LanguageModelingTask, Task
from pretrace.modeling.modules import TrackedModule
from pretrace.progress import progress_bar
from pretrace.scores.result import ScoreResult
from pretrace.scores.weights import DenseWeights, ModuleWeights, as_module_weights
from pretrace.settings.scores import IndexSettings
from pretrace.storage import SignedParts, read_record, read_sealed, write_record

INDEX_FILE = "index.json"
T = TypeVar("T")
FORMAT_VERSION = 3  # 3: sealed shards and index.json (older indexes are refused: rebuild them)
_REBUILD = "rebuild the index with `pretrace index`"


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _batch_entries(captured: CapturedBatch, batch: TokenBatch, tracked, settings: IndexSettings) -> dict[str, torch.Tensor]:
    """What one batch adds to a shard, per module (and, for factored storage, each token's document row)."""
    entries = {}
    if settings.storage == "factored":
        keep = batch.attention_mask.bool()
        entries["document_of_token"] = torch.arange(len(batch), device=keep.device)[:, None].expand_as(keep)[keep]
    for t in tracked:
        g, a = captured.output_gradients[t.name], captured.activations[t.name]
        if settings.storage == "exact":
            entries[t.name] = captured.example_gradients(t.name)
        else:
            entries[f"{t.name}.output_gradients"], entries[f"{t.name}.activations"] = g[keep], a[keep]
    return entries


def _merge(parts: list[dict[str, torch.Tensor]], sizes: list[int]) -> dict[str, torch.Tensor]:
    """Concatenate batches' entries; token rows point at documents numbered within the shard."""
    merged = {key: torch.cat([p[key] for p in parts]) for key in parts[0] if key != "document_of_token"}
    if "document_of_token" in parts[0]:
        offsets = torch.tensor([0] + sizes[:-1]).cumsum(0).tolist()
        merged["document_of_token"] = torch.cat([p["document_of_token"] + offset for p, offset in zip(parts, offsets)])
    return merged


def chunks(batches: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk = []
    for batch in batches:
        chunk.append(batch)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_index(
    model: torch.nn.Module,
    tracked: list[TrackedModule],
    batches: Iterable[TokenBatch],
    folder: str | Path,
    settings: IndexSettings | None = None,
    signature: dict | None = None,
    task: Task | None = None,
    num_batches: int | None = None,
    progress: bool = True,
) -> dict:
    """Write (or resume) the index of every document's loss gradient; returns its metadata.

    `signature` (model fingerprint, documents' hash, ...) must equal the one a partial index was started
    with, so a resumed build never mixes two corpora."""
    settings, task, folder = settings or IndexSettings(), task or LanguageModelingTask(), Path(folder)
    dtype = compute_dtype(model)
    signature = {"settings": to_dict(settings), "modules": {t.name: [t.d_out, t.d_in_total] for t in tracked}, **(signature or {})}
    if (folder / INDEX_FILE).is_file():
        meta = read_record(folder / INDEX_FILE, _REBUILD)
        if meta.get("signature") != signature:
            raise PretraceError(f"{folder}: holds an index of other documents, model or settings; choose another folder or delete it.")
        return meta  # complete: only a finished build writes index.json
    parts = SignedParts(folder, signature, "index build (other documents, model or settings)")
    total = None if num_batches is None else -(-num_batches // settings.shard_batches)
    shards, ids = [], []
    source = LiveGradients(model, tracked, batches, document_loss(task))
    for number, chunk in enumerate(progress_bar(chunks(source, settings.shard_batches), total=total, desc="indexing documents", unit="shard", enabled=progress)):
        name, chunk_ids = _shard_name(number), [i for gradients in chunk for i in gradients.ids]
        # shards an interrupted build of the same signature wrote are kept, if their seal holds
        if parts.load(name, "the shard is computed again") is None:
            entries = []
            for gradients in chunk:
                batch = _batch_entries(gradients.captured, gradients.batch, tracked, settings)
                entries.append({k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()})
                gradients.release()
            parts.save(name, _merge(entries, [len(g.ids) for g in chunk]), documents=len(chunk_ids))
        shards.append({"file": parts.path(name).name, "documents": len(chunk_ids)})
        ids.extend(chunk_ids)
    if not ids:
        raise PretraceError("no documents to index.")
    meta = {"format_version": FORMAT_VERSION, "signature": signature, "complete": True, "storage": settings.storage,
            "modules": signature["modules"], "shards": shards, "document_ids": ids}
    write_record(folder / INDEX_FILE, meta)
    return meta


def read_index(folder: str | Path) -> dict:
    """The metadata of a complete index (refuses a partial one)."""
    folder = Path(folder)
    if not (folder / INDEX_FILE).is_file():
        if any(folder.glob("shard-*.safetensors")):
            raise PretraceError(f"{folder}: the index is incomplete; rerun the same `pretrace index` command to finish it.")
        raise PretraceError(f"{folder}: not a gradient index (no {INDEX_FILE}); build one with `pretrace index`.")
    meta = read_record(folder / INDEX_FILE, _REBUILD)  # sealed, like every shard (each checked as it is read)
    if meta.get("format_version") != FORMAT_VERSION:
        raise PretraceError(f"{folder}: index format {meta.get('format_version')!r} is not {FORMAT_VERSION}; {_REBUILD}.")
    if not meta.get("complete"):
        raise PretraceError(f"{folder}: the index is incomplete; rerun the same `pretrace index` command to finish it.")
    shards, ids = meta.get("shards"), meta.get("document_ids")
    well_formed = (isinstance(shards, list) and isinstance(ids, list) and isinstance(meta.get("modules"), dict)
                   and all(isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("documents"), int) for e in shards))
    if not well_formed or sum(e["documents"] for e in shards) != len(ids):
        raise PretraceError(f"{folder / INDEX_FILE}: malformed (shards, modules or document ids); {_REBUILD}.")
    return meta


def _shard_scores(shard: dict[str, torch.Tensor], name: str, weights: torch.Tensor, storage: str, documents: int) -> torch.Tensor:
    """[Q, documents] scores of one module against one shard (exact gradients or their token factors)."""
    if storage == "exact":
        stored = shard[name].to(weights.dtype)
        return weights.reshape(len(weights), -1) @ stored.reshape(len(stored), -1).T
    padded = CapturedBatch({name: _padded(shard[f"{name}.activations"], shard["document_of_token"], documents).to(weights.dtype)},
                           {name: _padded(shard[f"{name}.output_gradients"], shard["document_of_token"], documents).to(weights.dtype)}, None)
    return DenseWeights(weights).scores(padded, name, per_token=False)[0]  # the cheaper of materialising and contracting tokens


def _padded(rows: torch.Tensor, document_of_token: torch.Tensor, documents: int) -> torch.Tensor:
    """`[documents, longest, d]` from token rows `[n, d]` grouped by document (in order), zero-padded."""
    counts = torch.bincount(document_of_token, minlength=documents)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(len(rows)) - starts[document_of_token]
    out = rows.new_zeros(documents, int(counts.max()), rows.shape[-1])
    out[document_of_token, position] = rows
    return out


def score_index(
    folder: str | Path,
    weights: dict[str, torch.Tensor | ModuleWeights],
    query_ids: list[str],
    expected: dict | None = None,
    per_module: bool = False,
    progress: bool = False,
) -> ScoreResult:
    """`[Q, N]` scores of preconditioned query weights against every indexed document.

    `expected` holds signature entries (model fingerprint, documents' hash, ...) the index must have."""
    folder, start = Path(folder), time.perf_counter()
    meta = read_index(folder)
    for key, value in (expected or {}).items():
        if meta["signature"].get(key) != value:
            raise PretraceError(f"{folder}: the index was built with another {key.replace('_', ' ')}; rebuild it with `pretrace index` for these documents and this model.")
    names = list(meta["modules"])
    missing = [n for n in names if n not in weights]
    if missing:
        raise PretraceError(f"{folder}: indexes modules the queries lack ({', '.join(missing[:3])}...); use the same --preset/--modules as `pretrace index`.")
    storage = meta["storage"]
    stored = {name: as_module_weights(weights[name]).settle(None).dense().double() for name in names}
    columns, module_columns = [], []
    for entry in progress_bar(meta["shards"], desc="scoring the index", unit="shard", enabled=progress):
        shard, _ = read_sealed(folder / entry["file"])
        per = torch.stack([_shard_scores(shard, name, stored[name], storage, entry["documents"]) for name in names])
        columns.append(per.sum(0))
        module_columns.append(per)
    return ScoreResult(
        scores=torch.cat(columns, dim=1), query_ids=list(query_ids), document_ids=list(meta["document_ids"]), module_names=names,
        per_module=torch.cat(module_columns, dim=2) if per_module else None, timings={"documents_seconds": time.perf_counter() - start},
    )


def check_index(folder: str | Path, documents, train, train_name: str) -> None:
    """Refuse, before any work, an index built for other documents (`train`, named `train_name`), another model than
    the `documents` stage, or other settings, naming the flag to fix."""
    recorded = read_index(folder)["signature"]
    if recorded.get("model_fingerprint") != documents.fingerprint:
        raise PretraceError(f"--index {folder} was built with another model than {documents.path}; pass that model, or rebuild the index with `pretrace index --model {documents.path}`.")
    if recorded.get("documents_sha256") != source_sha256(train):
        raise PretraceError(f"--index {folder} was built on other documents than --train {train_name}; pass the --train file it indexes, or rebuild it.")
    used = {"max_length": documents.options.max_length, "dtype": documents.options.dtype, "preset": documents.options.preset,
            "modules_regex": documents.options.modules, "attention_blocks": documents.options.attention_blocks}
    for key, value in used.items():
        if key in recorded and recorded[key] != value:
            flag = "--modules" if key == "modules_regex" else "--" + key.replace("_", "-")
            built, fix = (f"without {flag}", f"drop {flag}") if recorded[key] is None else (f"with {flag} {recorded[key]}", f"pass {flag} {recorded[key]}")
            uses = f"does not pass {flag}" if value is None else f"uses {flag} {value}"
            raise PretraceError(f"--index {folder} was built {built}, but this run {uses}; {fix}, or rebuild the index with these settings.")
    shapes = {t.name: [t.d_out, t.d_in_total] for t in documents.tracked}
    if recorded.get("modules") != shapes:
        raise PretraceError(f"--index {folder} holds other modules than this run tracks ({len(recorded.get('modules') or {})} vs {len(shapes)}); "
                            "pass the --preset, --modules and --attention-blocks the index was built with, or rebuild it.")
