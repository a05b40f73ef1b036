"""The exact and iterative inverse-curvature methods (`exact`, `cg`, `lissa`, `arnoldi`) as attributors.

Each is `PreconditionedGradients` with its solver as the preconditioner: `fit` (the one-off cost) gathers
the fitting batches and builds the solver (dense factorisation, Arnoldi basis, damping and LiSSA scale
estimates); `score` (the per-query cost) runs the solves and the usual document pass. The curvature is
that of the document model, averaged over --fit-data (default: the scored documents). Single-stage only.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

from pretrace.baselines.arnoldi import ArnoldiInverse
from pretrace.baselines.cg import ConjugateGradient
from pretrace.baselines.curvature_products import CurvatureProducts, FlatInverse
from pretrace.baselines.exact import ExactInverse
from pretrace.baselines.lissa import LiSSA
from pretrace.errors import PretraceError
from pretrace.methods.base import ScoringContext
from pretrace.methods.gradient import PreconditionedGradients


def fitting_products(context: ScoringContext, kind: str, fit_data: str | None = None) -> CurvatureProducts:
    """Products with the curvature of the document stage over `fit_data` (or `context.extra["fit_data"]`,
    else the scored documents); prompt/completion pairs count their completion tokens only."""
    stage = context.document_stage
    source = fit_data or context.extra.get("fit_data")
    batches = stage.fitting_batches(source) if source is not None else stage.document_batches(context.documents)
    return CurvatureProducts(stage.model, stage.tracked, list(batches()), kind)


def _common(settings) -> dict:
    return {"damping": settings.damping, "damping_factor": settings.damping_factor}


SOLVERS: dict[str, Callable[[CurvatureProducts, object], FlatInverse]] = {
    "exact": lambda products, s: ExactInverse(products, max_parameters=s.exact_max_parameters, progress=True, **_common(s)),
    "cg": lambda products, s: ConjugateGradient(products, s.iterations, s.tolerance, seed=s.solver_seed, progress=True, **_common(s)),
    "lissa": lambda products, s: LiSSA(products, s.lissa_depth, s.lissa_repeats, s.lissa_scale, seed=s.solver_seed, progress=True, **_common(s)),
    "arnoldi": lambda products, s: ArnoldiInverse(products, s.arnoldi_rank, s.arnoldi_iterations, seed=s.solver_seed, progress=True, **_common(s)),
}


def build_solver_method(name: str, settings) -> PreconditionedGradients:
    if settings.is_multi_stage:
        raise PretraceError(f"--method {name} is single-stage only; pass --model instead of --pretrained/--finetuned "
                            "(or use --method ekfac for multi-stage influence).")
    if settings.fit_data is not None and not Path(settings.fit_data).is_file():
        raise PretraceError(f"--fit-data {settings.fit_data}: no such file; pass a JSONL of documents or prompt/completion pairs.")

    def make(context: ScoringContext) -> FlatInverse:
        return SOLVERS[name](fitting_products(context, settings.curvature, settings.fit_data), settings)

    return PreconditionedGradients(name, make, {"fit_data": settings.fit_data or "the scored documents"})


build_exact = partial(build_solver_method, "exact")
build_cg = partial(build_solver_method, "cg")
build_lissa = partial(build_solver_method, "lissa")
build_arnoldi = partial(build_solver_method, "arnoldi")
