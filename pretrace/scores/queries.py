"""Precondition every query once, straight from its captured token factors.

Three routes, chosen by what the preconditioner declares:
- "eigenbasis" (`kronecker_eigenbasis`: EK-FAC/K-FAC inverses, scaled, placed on another device or rank, or
  chained as in multi-stage influence): a query's gradient Σ_t g_t a_tᵀ enters the first operator's
  eigenbasis through its T token factors (never as a dense matrix), is divided by the damped eigenvalues
  there, passes on through any later operators, and stays in the last one's eigenbasis: `score_documents`
  later rotates it back only if that is cheaper than rotating the documents' tokens.
- "tokens" (`is_identity`, also placed): the gradient itself, kept exactly as its token factors (rank ≤ T) when
  that is smaller than the dense matrix; `query_rank` does not apply (nothing is approximated, no error reported).
- "dense": any other preconditioner gets the dense query gradients (`query_gradients`) and `apply`.
Optionally each query's weights are truncated to rank r (`query_rank`), with the error reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from pretrace.curvature.operators import Preconditioner
from pretrace.data.batching import TokenBatch
from pretrace.errors import PretraceError
from pretrace.gradients.capture import CapturedBatch, compute_dtype
from pretrace.gradients.source import LiveGradients, measurement
from pretrace.gradients.task import LanguageModelingTask, Task
from pretrace.modeling.modules import TrackedModule
from pretrace.progress import progress_bar
from pretrace.scores.plan import ScoringPlan
from pretrace.scores.pairwise import query_gradients
from pretrace.scores.weights import DenseWeights, EigenbasisWeights, LowRankWeights, ModuleWeights


@dataclass
class PreconditionedQueries:
    ids: list[str]
    weights: dict[str, ModuleWeights]  # what `score_documents` takes
    low_rank_error: dict[str, torch.Tensor] | None = None  # per module [Q]: ‖W - W_r‖_F / ‖W‖_F
    relative_error: torch.Tensor | None = None  # [Q]: the same over all modules together
    route: str = "dense"  # "eigenbasis": from token factors, kept in the Kronecker eigenbasis; "tokens": P = I, exact token factors; "dense": P applied to dense gradients


def _factored_weights(model, tracked, batches, preconditioner, task, rank, plan, progress) -> tuple[list[str], dict[str, list]]:
    """Per module, per query batch: eigenbasis weights (rank-truncated right away when `rank` is set, so
    full-rank weights of all queries never coexist), with their errors and squared norms; for P = I the
    token factors themselves (exact)."""
    device, dtype = next(model.parameters()).device, compute_dtype(model)
    ids: list[str] = []
    parts: dict[str, list] = {t.name: [] for t in tracked}
    for gradients in progress_bar(LiveGradients(model, tracked, plan.shard_queries(batches), measurement(task)), desc="query gradients", unit="batch", enabled=progress):
        ids.extend(gradients.ids)
        for name, piece in factored_batch_weights(gradients.captured, tracked, preconditioner, rank, dtype).items():
            parts[name].append(piece)
    if not ids:  # a rank may hold no query
        parts = {t.name: [_compressed(DenseWeights(torch.zeros(0, t.d_out, t.d_in_total, device=device, dtype=dtype)), None)] for t in tracked}
    return ids, parts


def factored_batch_weights(captured: CapturedBatch, tracked: list[TrackedModule], preconditioner: Preconditioner, rank: int | None,
                           dtype: torch.dtype) -> dict[str, tuple[ModuleWeights, torch.Tensor | None, torch.Tensor | None]]:
    """Per module, one captured batch's P ∇ (in P's last eigenbasis, or as token factors for P = I) straight from its
    token factors, with (when `rank` truncates) each example's relative error and squared norm."""
    pieces = {}
    for t in tracked:
        g, a = captured.output_gradients[t.name].to(dtype), captured.activations[t.name].to(dtype)
        if preconditioner.is_identity:
            pieces[t.name] = _token_factors(g, a)  # exact: nothing to truncate
        else:
            pieces[t.name] = _compressed(DenseWeights(preconditioner.apply_factored_in_eigenbasis(t.name, g, a)), rank)
    return pieces


def _compressed(weights: DenseWeights, rank: int | None) -> tuple[ModuleWeights, torch.Tensor | None, torch.Tensor | None]:
    """(weights, relative error [Q], squared norms [Q]) truncated to `rank` (the eigenbasis is orthogonal:
    truncating there is truncating in the parameter basis); unchanged, without errors, when None."""
    if rank is None:
        return weights, None, None
    low_rank, error = LowRankWeights.truncate(weights.weights, rank)
    return low_rank, error, weights.weights.double().square().flatten(1).sum(1)


def _token_factors(g: torch.Tensor, a: torch.Tensor) -> tuple[ModuleWeights, None, None]:
    """A batch's gradients Σ_t g_t a_tᵀ as their T token factors (exact) when T (d_out + d_in') is below
    d_out·d_in', else dense; positions without gradient (padding) are dropped from the factors."""
    live = g.abs().amax((0, 2)) > 0  # [T]: positions any query's measurement depends on
    g, a = g[:, live], a[:, live]
    t, d_out, d_in = g.shape[1], g.shape[2], a.shape[-1]
    weights = LowRankWeights(g.transpose(1, 2).contiguous(), a.transpose(1, 2).contiguous())
    return (DenseWeights(weights.dense()) if t * (d_out + d_in) >= d_out * d_in else weights), None, None


def _joined(pieces: list[ModuleWeights]) -> ModuleWeights:
    """One module's weights from its per-batch pieces: low-rank ones of unequal rank padded with zero columns
    (which score nothing); dense if any piece is."""
    if all(isinstance(p, LowRankWeights) for p in pieces):
        width = max(p.left.shape[-1] for p in pieces)
        pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[-1]))  # noqa: E731
        return LowRankWeights(torch.cat([pad(p.left) for p in pieces]), torch.cat([pad(p.right) for p in pieces]))
    return DenseWeights(torch.cat([p.dense() for p in pieces]))


def precondition_queries(
    model: torch.nn.Module,
    tracked: list[TrackedModule],
    batches: Iterable[TokenBatch],
    preconditioner: Preconditioner,
    query_rank: int | None = None,
    task: Task | None = None,
    progress: bool = False,
    plan: ScoringPlan | None = None,
) -> PreconditionedQueries:
    """Each query's preconditioned gradient P ∇m(x) per module, in the form cheapest to score with (this
    rank's queries only when `plan` splits queries)."""
    if query_rank is not None and query_rank < 1:
        raise PretraceError(f"--query-rank must be at least 1 (or unset for full rank), got {query_rank}.")
    task, plan = task or LanguageModelingTask(), plan or ScoringPlan()
    route = "tokens" if preconditioner.is_identity else "eigenbasis" if preconditioner.kronecker_eigenbasis else "dense"
    if route == "tokens":
        ids, parts = _factored_weights(model, tracked, batches, preconditioner, task, query_rank, plan, progress)
        weights = {name: _joined([w for w, _, _ in pieces]) for name, pieces in parts.items()}
    elif route == "eigenbasis":
        device, dtype = next(model.parameters()).device, compute_dtype(model)
        ids, parts = _factored_weights(model, tracked, batches, preconditioner, task, query_rank, plan, progress)
        weights = {name: EigenbasisWeights(_joined([w for w, _, _ in pieces]), *preconditioner.eigenbasis(name, device, dtype)) for name, pieces in parts.items()}
    else:
        ids, grads = query_gradients(model, tracked, batches, task, progress, plan)
        parts = {name: [_compressed(DenseWeights(w), query_rank)] for name, w in _apply_releasing(preconditioner, grads)}
        weights = {name: pieces[0][0] for name, pieces in parts.items()}
    if query_rank is None or route == "tokens":  # token factors are exact: no truncation, no error
        return PreconditionedQueries(ids, weights, route=route)
    errors = {name: torch.cat([e for _, e, _ in pieces]) for name, pieces in parts.items()}
    norms = {name: torch.cat([n for _, _, n in pieces]) for name, pieces in parts.items()}
    residual = sum(errors[name].square() * norms[name] for name in errors)
    relative = (residual / sum(norms.values()).clamp(min=torch.finfo(torch.float64).tiny)).sqrt()
    return PreconditionedQueries(ids, weights, errors, relative, route)


def _apply_releasing(preconditioner: Preconditioner, grads: dict[str, torch.Tensor]):
    """(name, P v) pairs; a module-wise P takes the gradients out of `grads` one module at a time, so raw and
    preconditioned gradients never coexist in full (multi-stage chains hold no full intermediates either)."""
    if not preconditioner.module_wise:
        yield from preconditioner.apply(grads).items()
        return
    for name in list(grads):
        yield name, preconditioner.apply({name: grads.pop(name)})[name]
