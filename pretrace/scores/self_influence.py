"""Self-influence ∇ℓ(z)ᵀ P ∇ℓ(z) of every document: how unusual (or mislabeled) it is.

Each batch's documents are preconditioned the way queries are (`factored_batch_weights`: from token factors into
P's eigenbasis, or as exact token factors for P = I; P applied to dense gradients otherwise) and met by their own
gradients through the same `ModuleWeights.scores` that scores queries against documents; the diagonal is kept.
"""

from __future__ import annotations

from typing import Iterable

import torch

from pretrace.curvature.operators import Preconditioner
from pretrace.data.batching import TokenBatch
from pretrace.gradients.capture import compute_dtype
from pretrace.gradients.source import LiveGradients, document_loss
from pretrace.gradients.task import Task
from pretrace.modeling.modules import TrackedModule
from pretrace.parallel.collectives import gather_in_order, shard
from pretrace.parallel.group import is_main
from pretrace.progress import progress_bar
from pretrace.scores.queries import factored_batch_weights
from pretrace.scores.weights import DenseWeights, EigenbasisWeights


def self_influence(
    model: torch.nn.Module,
    tracked: list[TrackedModule],
    preconditioner: Preconditioner,
    batches: Iterable[TokenBatch],
    task: Task | None = None,
    progress: bool = False,
) -> tuple[list[str], torch.Tensor]:
    """Document ids and ∇ℓ(z)ᵀ P ∇ℓ(z) `[N]` float64, in document order (documents split over ranks)."""
    device, dtype = next(model.parameters()).device, compute_dtype(model)
    order, records = [], []
    source = LiveGradients(model, tracked, batches, document_loss(task), select=shard)
    for gradients in progress_bar(source, desc="self-influence", unit="batch", enabled=progress and is_main()):
        captured = gradients.captured
        if preconditioner.is_identity or preconditioner.kronecker_eigenbasis:
            pieces = factored_batch_weights(captured, tracked, preconditioner, None, dtype)
            weights = {name: piece if preconditioner.is_identity else EigenbasisWeights(piece, *preconditioner.eigenbasis(name, device, dtype))
                       for name, (piece, _, _) in pieces.items()}
        else:
            grads = {t.name: captured.example_gradients(t.name).to(dtype) for t in tracked}
            weights = {name: DenseWeights(w) for name, w in preconditioner.apply(grads).items()}
        total = sum(torch.diagonal(weights[t.name].scores(captured, t.name, False)[0]).double() for t in tracked)
        order.append(gradients.index)
        records.append((gradients.ids, total.cpu()))
    records = gather_in_order(order, records)
    return [i for ids, _ in records for i in ids], torch.cat([values for _, values in records])
