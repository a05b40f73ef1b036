"""The exact and iterative inverse-curvature methods (`exact`, `cg`, `lissa`, `arnoldi`) as attributors.

Each is `PreconditionedGradients` with its solver as the preconditioner: `fit` (the one-off cost) gathers
the fitting batches and builds the solver (dense factorisation, Arnoldi basis, damping and LiSSA scale
estimates); `score` (the per-query cost) runs the solves and the usual document pass. The curvature is
that of the document model, averaged over --fit-data (default: the scored documents). Single-stage only.
"""

from __future__ import annotations

from typing import Callable

from pretrace.baselines.arnoldi import ArnoldiInverse
from pretrace.baselines.cg import ConjugateGradient
from pretrace.baselines.curvature_products import CurvatureProducts, FlatInverse
from pretrace.baselines.exact import ExactInverse
from pretrace.baselines.lissa import LiSSA
from pretrace.data.records import check_source
from pretrace.methods.base import ScoringContext
from pretrace.methods.gradient import PreconditionedGradients


def fitting_products(context: ScoringContext, kind: str, fit_data: str | None = None) -> CurvatureProducts:
    """Products with the curvature of the document stage over `fit_data` (or `context.extra["fit_data"]`,
    else the scored documents); prompt/completion pairs count their completion tokens only."""
    stage = context.document_stage
    source = fit_data or context.extra.get("fit_data")
    batches = stage.fitting_batches(source) if source is not None else stage.document_batches(context.documents)
    return CurvatureProducts(stage.model, stage.tracked, list(batches()), kind)


def _damping(damping) -> dict:
    return {"damping": damping.absolute, "damping_factor": damping.relative}


SOLVERS: dict[str, Callable[[CurvatureProducts, object, object], FlatInverse]] = {
    "exact": lambda products, m, d: ExactInverse(products, max_parameters=m.max_parameters, progress=True, **_damping(d)),
    "cg": lambda products, m, d: ConjugateGradient(products, m.iterations, m.tolerance, seed=m.solver_seed, progress=True, **_damping(d)),
    "lissa": lambda products, m, d: LiSSA(products, m.depth, m.repeats, m.scale, seed=m.solver_seed, progress=True, **_damping(d)),
    "arnoldi": lambda products, m, d: ArnoldiInverse(products, m.rank, m.iterations, seed=m.solver_seed, progress=True, **_damping(d)),
}


def build_solver_method(method, damping) -> PreconditionedGradients:
    """A curvature solver from its config (`pretrace.methods.config.CurvatureSolver`) and the run's damping."""
    if method.fit_data is not None:
        check_source(method.fit_data, "fitting documents (--fit-data)")

    def make(context: ScoringContext) -> FlatInverse:
        return SOLVERS[method.name](fitting_products(context, method.curvature, method.fit_data), method, damping)

    return PreconditionedGradients(method.name, make, {"fit_data": method.fit_data or "the scored documents"})
