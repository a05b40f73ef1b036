"""A score folder: `scores.safetensors` (float32 `[Q, N]`, optional per-module `[M, Q, N]`), `scores.json`
(method, settings, ids, timings) and `top_k.jsonl` (per query its top documents with text and explanations)."""

from __future__ import annotations

from pathlib import Path

import torch

from pretrace.errors import PretraceError
from pretrace.scores.pairwise import ScoreResult
from pretrace.storage import read_json, read_tensors, write_json, write_jsonl, write_tensors

SCORES_FILE = "scores.safetensors"
METADATA_FILE = "scores.json"
TOP_K_FILE = "top_k.jsonl"


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[Q, min(k, N)] indices of the highest scores, ties broken by document order."""
    k = min(k, scores.shape[1])
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, :k]


def save_scores(folder: Path, result: ScoreResult, metadata: dict, top_k_rows: list[dict]) -> None:
    tensors = {"scores": result.scores.float()}
    if result.per_module is not None:
        tensors["per_module"] = result.per_module.float()
    if result.self_influence is not None:
        tensors["self_influence"] = result.self_influence.float()
    write_tensors(folder / SCORES_FILE, tensors)
    write_json(folder / METADATA_FILE, {
        **metadata,
        "query_ids": result.query_ids,
        "document_ids": result.document_ids,
        "module_names": result.module_names,
        "shape": list(result.scores.shape),
    })
    write_jsonl(folder / TOP_K_FILE, top_k_rows)


def load_scores(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    if not (folder / METADATA_FILE).is_file():
        raise PretraceError(f"{folder}: not a score folder (no {METADATA_FILE}); create one with `pretrace score`.")
    return read_tensors(folder / SCORES_FILE), read_json(folder / METADATA_FILE)
