"""A score folder: `scores.safetensors` (float32 `[Q, N]`, optional per-module `[M, Q, N]`), `scores.json`
(method, settings, ids, timings) and `top_k.jsonl` (per query its top documents with text and explanations)."""

from __future__ import annotations

from pathlib import Path

import torch

from pretrace.errors import PretraceError
from pretrace.scores.result import ScoreResult
from pretrace.storage import read_json_object, read_tensors, verify_folder, write_json, write_jsonl, write_tensors

SCORES_FILE = "scores.safetensors"
METADATA_FILE = "scores.json"
TOP_K_FILE = "top_k.jsonl"
_RECOMPUTE = "recompute the scores with `pretrace score`"
FORMAT_VERSION = 3  # 3: the folder's .pretrace.json manifest holds every file's sha256 (older folders are refused: recompute them)


def require_finite(tensors: dict[str, torch.Tensor], method: str | None = None) -> None:
    """Refuse to write NaN or infinite scores: every later step (ranking, `inspect`, `report`) would be silently wrong."""
    for name, tensor in tensors.items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise PretraceError(
                f"{bad} of {tensor.numel()} values in {name!r}{f' (--method {method})' if method else ''} are NaN or infinite (beyond float32), so nothing was written; "
                "check --damping/--alpha, score with --dtype float32 or float64, and refit factors with --factor-dtype float32 or float64."
            )


def save_scores(folder: Path, result: ScoreResult, metadata: dict, top_k_rows: list[dict]) -> None:
    """Tensors, top-k rows and `scores.json` (the commit adds the folder's manifest of sha256s)."""
    tensors = {"scores": result.scores.float()}
    if result.per_module is not None:
        tensors["per_module"] = result.per_module.float()
    if result.self_influence is not None:
        tensors["self_influence"] = result.self_influence.float()
    if result.per_token is not None:  # ragged per document: concatenated, with each document's token offset
        lengths = torch.tensor([0] + [len(ids) for ids in result.document_token_ids], dtype=torch.int64)
        tensors["token_scores"] = torch.cat(result.per_token, dim=1).float()
        tensors["token_ids"] = torch.tensor([t for ids in result.document_token_ids for t in ids], dtype=torch.int64)
        tensors["token_offsets"] = lengths.cumsum(0)
    require_finite(tensors, metadata.get("method"))
    write_tensors(folder / SCORES_FILE, tensors)
    write_jsonl(folder / TOP_K_FILE, top_k_rows)
    write_json(folder / METADATA_FILE, {
        **metadata,
        "query_ids": result.query_ids,
        "document_ids": result.document_ids,
        "module_names": result.module_names,
        "shape": list(result.scores.shape),
        "format_version": FORMAT_VERSION,
    })


def load_scores(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Scores and metadata, verified against the sha256 and shape recorded in `scores.json`."""
    folder = Path(folder)
    if not (folder / METADATA_FILE).is_file():
        raise PretraceError(f"{folder}: not a score folder (no {METADATA_FILE}); create one with `pretrace score`.")
    verify_folder(folder, "score", _RECOMPUTE)
    meta = read_json_object(folder / METADATA_FILE, _RECOMPUTE)
    if meta.get("format_version") != FORMAT_VERSION:
        raise PretraceError(f"{folder / METADATA_FILE}: not a score folder of this pretrace version (format {meta.get('format_version')!r}, "
                            f"expected {FORMAT_VERSION}); {_RECOMPUTE}.")
    tensors = read_tensors(folder / SCORES_FILE)
    if "scores" not in tensors or list(tensors["scores"].shape) != meta.get("shape"):
        raise PretraceError(f"{folder / SCORES_FILE}: its scores do not have the shape {meta.get('shape')} recorded in {METADATA_FILE}; {_RECOMPUTE}.")
    return tensors, meta
