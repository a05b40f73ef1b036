"""Influence as preconditioned gradient dot products: EK-FAC, K-FAC, diagonal, identity, multi-stage.

All share one path: query gradients → preconditioner → streamed document gradients.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pretrace.curvature import EKFAC, KFAC, Chain, Diagonal, Factors, Identity, Preconditioner, Scaled
from pretrace.config import IN_MEMORY
from pretrace.errors import PretraceError
from pretrace.methods.base import Attributor, ScoringContext
from pretrace.modeling.modules import ALL_PARAMETERS, only_linear_modules, require_linear_modules
from pretrace.scores.explanations import Explain
from pretrace.scores.pairwise import score_documents
from pretrace.scores.result import ScoreResult
from pretrace.scores.queries import precondition_queries

CURVATURES = {"ekfac": EKFAC, "kfac": KFAC, "diagonal": Diagonal}


class PreconditionedGradients(Attributor):
    """score(z, x) = ∇m(x)ᵀ P ∇ℓ(z) with P built by `make_preconditioner(context)` during `fit`."""

    preconditions_queries = True

    def __init__(self, name: str, make_preconditioner: Callable[[ScoringContext], Preconditioner], hyperparameters: dict | None = None,
                 query_rank: int | None = None):
        self.name, self._make, self._hyper = name, make_preconditioner, dict(hyperparameters or {})
        self.query_rank = query_rank  # truncate preconditioned query gradients to this rank per module (None: exact)
        self.query_rank_error: list[float] | None = None  # per query: relative Frobenius error of the truncation
        self.query_route: str | None = None  # how the queries were last preconditioned ("eigenbasis", "tokens" or "dense"), for scores.json
        self.preconditioner: Preconditioner | None = None
        self._prepared: tuple[tuple, tuple[list[str], dict]] | None = None  # the last queries' preconditioned weights

    def fit(self, context: ScoringContext) -> None:
        self.preconditioner = self._make(context)
        self._prepared = None

    def precondition_queries(self, context: ScoringContext) -> tuple[list[str], dict]:
        """P ∇m(x) once per query, in the form cheapest to score with (EK-FAC/K-FAC: kept in their eigenbasis).

        Prepared once per set of queries and kept: scoring the same queries again (the top documents'
        explanations, another document set) reuses them instead of redoing the backward passes and the
        preconditioning."""
        if self.preconditioner is None:
            raise RuntimeError("call fit() before score()")
        stage = context.query_stage
        key = (id(stage.model), id(self.preconditioner), tuple(t.name for t in stage.tracked),
               tuple((q.id, q.prompt, q.completion) for q in context.queries), context.plan.split, id(context.task))
        if self._prepared is not None and self._prepared[0] == key:
            return self._prepared[1]
        queries = precondition_queries(stage.model, stage.tracked, stage.query_batches(context.queries), self.preconditioner,
                                       task=context.task, query_rank=self.query_rank, progress=context.progress, plan=context.plan)
        if queries.relative_error is not None:
            self.query_rank_error = queries.relative_error.tolist()
        self.query_route = queries.route
        self._prepared = (key, (queries.ids, queries.weights))
        return queries.ids, queries.weights

    def score(self, context: ScoringContext, per_module: bool = False, per_token: bool = False, explain: Explain | None = None) -> ScoreResult:
        """`explain`: the top documents' per-token and per-module contributions, taken in the same pass (`result.explanations`)."""
        docs = context.document_stage
        if (per_token or explain) and not only_linear_modules(docs.tracked):
            raise PretraceError(f"--method {self.name}: per-token contributions exist for linear modules only, not for the other "
                                f"parameters --preset {ALL_PARAMETERS} tracks; score without them (--no-explain) or use --preset all.")
        ids, weights = self.precondition_queries(context)
        return score_documents(
            docs.model, docs.tracked, weights, docs.document_batches(context.documents)(), ids,
            per_module=per_module, per_token=per_token, num_batches=docs.document_batch_count(context.documents), progress=context.progress, plan=context.plan,
            explain=explain,
        )

    def hyperparameters(self) -> dict:
        described = self.preconditioner.describe() if self.preconditioner is not None else {}
        rank = {} if self.query_rank is None else {"query_rank": self.query_rank, "query_rank_relative_error": self.query_rank_error}
        return {**self._hyper, **rank, "preconditioner": described, "query_route": self.query_route}


FactorSource = str | Path | Factors  # a folder made by `pretrace fit`, or factors the Python API was handed


def factors_name(source: FactorSource | None) -> str | None:
    """How records name a factor source: its folder, or IN_MEMORY."""
    return IN_MEMORY if isinstance(source, Factors) else None if source is None else str(source)


def load_checked_factors(source: FactorSource, stage, where: str) -> Factors:
    factors = source if isinstance(source, Factors) else Factors.load(source)
    factors.check_matches(stage.tracked, stage.fingerprint, where=f"{where} ({factors_name(source)})")
    return factors


def curvature_inverse(kind: str, factors: Factors, damping: float | None, damping_factor: float) -> Preconditioner:
    if kind not in CURVATURES:
        raise PretraceError(f"unknown curvature {kind!r}; choose one of {sorted(CURVATURES)}.")
    return CURVATURES[kind](factors, damping=damping, damping_factor=damping_factor)


def single_stage(kind: str, factors_dir: FactorSource | None, damping: float | None, damping_factor: float) -> PreconditionedGradients:
    """(F̂ + λI)⁻¹ of the model the documents and queries share; `identity` needs no factors."""
    if kind == "identity":
        return PreconditionedGradients("identity", lambda context: Identity())

    def make(context: ScoringContext) -> Preconditioner:
        require_linear_modules(context.document_stage.tracked, f"--method {kind}")
        if factors_dir is None:
            raise PretraceError(f"--method {kind} needs --factors (a folder made by `pretrace fit`).")
        factors = load_checked_factors(factors_dir, context.document_stage, "factors")
        return curvature_inverse(kind, factors, damping, damping_factor)

    return PreconditionedGradients(kind, make, {"factors": factors_name(factors_dir), "damping": damping, "damping_factor": damping_factor})


def multi_stage(kind: str, pretrained_factors: FactorSource, finetuned_factors: FactorSource, alpha: float,
                pretrained_damping: float | None, damping_factor: float, finetuned_damping: float | None) -> PreconditionedGradients:
    """α (H_ft + αI)⁻¹ H_pt⁻¹, applied to each query once: w = α H_pt⁻¹ (H_ft + αI)⁻¹ ∇m(x, θ_ft)."""
    if alpha is None or alpha <= 0:
        raise PretraceError(f"multi-stage influence needs a positive --alpha (the fine-tuning proximity strength), got {alpha}.")

    def make(context: ScoringContext) -> Preconditioner:
        require_linear_modules(context.document_stage.tracked, f"--method {kind}")
        ft = load_checked_factors(finetuned_factors, context.query_stage, "fine-tuned factors")
        pt = load_checked_factors(pretrained_factors, context.document_stage, "pre-trained factors")
        ft_inverse = curvature_inverse(kind, ft, alpha if finetuned_damping is None else finetuned_damping, damping_factor)
        pt_inverse = curvature_inverse(kind, pt, pretrained_damping, damping_factor)
        return Scaled(Chain([ft_inverse, pt_inverse]), alpha)

    return PreconditionedGradients(
        f"multi-stage-{kind}", make,
        {"alpha": alpha, "pretrained_factors": factors_name(pretrained_factors), "finetuned_factors": factors_name(finetuned_factors),
         "pretrained_damping": pretrained_damping, "finetuned_damping": alpha if finetuned_damping is None else finetuned_damping,
         "damping_factor": damping_factor},
    )
