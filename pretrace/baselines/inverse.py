"""The exact and iterative inverse-curvature methods (`exact`, `cg`, `lissa`, `arnoldi`) as attributors.

Each is `PreconditionedGradients` with its solver as the preconditioner: `fit` (the one-off cost) gathers
the fitting batches and builds the solver (dense factorisation, Arnoldi basis, damping and LiSSA scale
estimates); `score` (the per-query cost) runs the solves and the usual document pass. The curvature is
that of the document model, averaged over --fit-data (default: the scored documents). Single-stage only,
except `ekfac-cg`: CG preconditioned by EK-FAC (`refined_method`), which also refines each inverse of the
multi-stage chain, H_ft's over --finetuned-fit-data on the fine-tuned model.
"""

from __future__ import annotations

from typing import Callable

from pretrace.baselines.arnoldi import ArnoldiInverse
from pretrace.baselines.cg import ConjugateGradient
from pretrace.baselines.curvature_products import CurvatureProducts, FlatInverse
from pretrace.baselines.exact import ExactInverse
from pretrace.baselines.lissa import LiSSA
from pretrace.curvature import EKFAC, Chain, Scaled
from pretrace.data.records import check_source
from pretrace.errors import PretraceError
from pretrace.methods.base import ScoringContext
from pretrace.methods.gradient import FactorSource, PreconditionedGradients, factors_name, load_checked_factors
from pretrace.modeling.modules import require_linear_modules
from pretrace.modeling.stage import Stage


def fitting_products(context: ScoringContext, kind: str, fit_data: str | None = None, stage: Stage | None = None) -> CurvatureProducts:
    """Products with the curvature of `stage` (default: the document stage) over `fit_data` (or
    `context.extra["fit_data"]`, else the scored documents); prompt/completion pairs count their completion tokens only."""
    stage = context.document_stage if stage is None else stage
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


def refined_method(method, damping, factors: FactorSource | None, pretrained_factors: FactorSource | None = None,
                   finetuned_factors: FactorSource | None = None, alpha: float | None = None) -> PreconditionedGradients:
    """`ekfac-cg` from its config (`pretrace.methods.config.RefinedEKFAC`): single-stage, (C + λI)⁻¹ by CG
    preconditioned with the EK-FAC inverse of `factors`; multi-stage (`alpha` given), α (H_ft + α'I)⁻¹ (H_pt + λI)⁻¹
    with each inverse refined by its own preconditioned CG, H_ft on the fine-tuned model over --finetuned-fit-data
    (damped by α, or --finetuned-damping), H_pt on the pre-trained model over --fit-data."""
    if alpha is not None and not alpha > 0:
        raise PretraceError(f"multi-stage influence needs a positive --alpha (the fine-tuning proximity strength), got {alpha}.")
    if (alpha is not None) != (method.finetuned_fit_data is not None):
        raise PretraceError("--finetuned-fit-data (the fine-tuning pairs H_ft is averaged over) is needed in multi-stage scoring and only there.")
    for source, what in ((method.fit_data, "fitting documents (--fit-data)"), (method.finetuned_fit_data, "fine-tuning pairs (--finetuned-fit-data)")):
        if source is not None:
            check_source(source, what)

    def refined(context: ScoringContext, stage: Stage, source: FactorSource, fit_data: str | None, absolute: float | None, where: str) -> ConjugateGradient:
        ekfac = load_checked_factors(source, stage, where)
        return ConjugateGradient(fitting_products(context, method.curvature, fit_data, stage), method.iterations, method.tolerance,
                                 seed=method.solver_seed, progress=True, damping=absolute, damping_factor=damping.relative,
                                 preconditioner=lambda damped: EKFAC(ekfac, damping=method.preconditioner_scale * damped),
                                 shared_subspace=method.shared_subspace)

    def make(context: ScoringContext):
        require_linear_modules(context.document_stage.tracked, f"--method {method.name}")
        if alpha is None:
            return refined(context, context.document_stage, factors, method.fit_data, damping.absolute, "factors")
        ft = refined(context, context.query_stage, finetuned_factors, method.finetuned_fit_data,
                     alpha if damping.finetuned is None else damping.finetuned, "fine-tuned factors")
        pt = refined(context, context.document_stage, pretrained_factors, method.fit_data, damping.absolute, "pre-trained factors")
        return Scaled(Chain([ft, pt]), alpha)

    described = {"fit_data": method.fit_data or "the scored documents"}
    if alpha is None:
        described["factors"] = factors_name(factors)
    else:
        described.update(alpha=alpha, pretrained_factors=factors_name(pretrained_factors), finetuned_factors=factors_name(finetuned_factors),
                         finetuned_fit_data=method.finetuned_fit_data)
    return PreconditionedGradients(method.name if alpha is None else f"multi-stage-{method.name}", make, described)
