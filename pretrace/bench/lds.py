"""The linear datamodeling score (LDS): a ground truth for attribution built from actual retraining.

Retrain the model on K random halves S_k of a pool of N training documents (documents outside the pool
are always trained on), measure each query's loss L_k(q), and ask whether an attribution method's
linear prediction of the subset's effect ranks the subsets like the measured losses do. With the
library's sign convention (a positive score means up-weighting the document lowers the query's loss),
the prediction for subset S_k is the sum of the scores over its documents, Σ_{i ∈ S_k} τ(q, i), and a
larger predicted effect should mean a *lower* loss, so

    LDS(q) = Spearman over k of ( Σ_{i ∈ S_k} τ(q, i),  −L_k(q) ).

Every retrained subset is cached as one JSON file (written atomically), so an interrupted run resumes
at the first missing subset.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from pretrace.errors import PretraceError
from pretrace.metrics import spearman
from pretrace.progress import progress_bar
from pretrace.storage import read_json, write_json

MIN_SUBSETS = 50  # below this the per-query rank correlation over subsets is too noisy to compare methods


def subset_masks(pool_size: int, subsets: int, seed: int, fraction: float = 0.5) -> torch.Tensor:
    """`[K, N]` boolean membership of K seeded random subsets, each `round(fraction × N)` documents."""
    if pool_size < 2 or subsets < 2:
        raise PretraceError(f"the LDS needs at least 2 pool documents and 2 subsets, got {pool_size} and {subsets}; raise them.")
    if not 0 < fraction < 1:
        raise PretraceError(f"the LDS subset fraction must be in (0, 1), got {fraction}.")
    size = max(1, round(fraction * pool_size))
    masks = torch.zeros(subsets, pool_size, dtype=torch.bool)
    for k in range(subsets):
        masks[k, random.Random(f"{seed}/lds/{k}").sample(range(pool_size), size)] = True
    return masks


def predicted_effects(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """`[K, Q]`: for each subset and query, the sum of the query's scores over the subset's documents."""
    if scores.shape[1] != masks.shape[1]:
        raise PretraceError(f"scores cover {scores.shape[1]} documents but the subsets are drawn from {masks.shape[1]}; score the whole pool.")
    return masks.double() @ scores.double().T


def linear_datamodeling_scores(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor) -> list[float]:
    """Per query: Spearman over subsets of the predicted effect with the measured loss *decrease* (−loss).

    `scores` `[Q, N]` over the pool, `masks` `[K, N]`, `losses` `[K, Q]` of the models retrained on each subset.
    """
    if losses.shape != (masks.shape[0], scores.shape[0]):
        raise PretraceError(f"losses must be [subsets, queries] = {[masks.shape[0], scores.shape[0]]}, got {list(losses.shape)}.")
    predicted = predicted_effects(scores, masks)
    return [spearman(predicted[:, q], -losses[:, q].double()) for q in range(scores.shape[0])]


def warn_if_few(subsets: int) -> None:
    if subsets < MIN_SUBSETS:
        message = f"the LDS uses {subsets} retrained subsets, fewer than {MIN_SUBSETS}: its per-query correlations are noisy."
        warnings.warn(message)
        print(f"WARNING: {message}", flush=True)


def measure_subsets(folder: str | Path, masks: torch.Tensor, retrain_and_measure: Callable[[list[int]], Sequence[float]],
                    identity: dict | None = None, progress: bool = True) -> torch.Tensor:
    """`[K, Q]` query losses of models retrained on each subset, cached one JSON file per subset.

    `retrain_and_measure(member_indices)` trains on the pool documents at those indices (plus whatever
    the caller always includes) and returns the loss of every query. `identity` (e.g. preset and seed)
    is stored with each subset; a cached file with another identity or membership is refused.
    """
    folder = Path(folder)
    warn_if_few(len(masks))
    rows = []
    for k in progress_bar(range(len(masks)), desc="LDS retraining", unit="model", enabled=progress):
        members = torch.nonzero(masks[k]).flatten().tolist()
        path = folder / f"subset-{k:03d}.json"
        record = json.loads(json.dumps({"identity": identity or {}, "members": members}))  # as it reads back (tuples become lists)
        if path.is_file():
            cached = read_json(path)
            if {key: cached.get(key) for key in record} != record:
                raise PretraceError(f"{path}: a subset of another run (other membership or settings); delete {folder} to start over.")
            rows.append(cached["query_losses"])
            continue
        losses = [float(x) for x in retrain_and_measure(members)]
        write_json(path, {**record, "query_losses": losses})
        rows.append(losses)
    return torch.tensor(rows, dtype=torch.float64)
