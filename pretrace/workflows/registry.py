"""Method configs → attributors: the influence methods of `pretrace.methods` and the baselines. Each method is
built from its own config (`pretrace.methods.config`) and the shared settings it reads: the stages' factor
folders, the damping and the multi-stage α the run resolved."""

from __future__ import annotations

from typing import Callable

from pretrace.baselines import inverse, similarity, text, trak
from pretrace.methods import config as methods
from pretrace.methods.base import Attributor
from pretrace.methods.gradient import PreconditionedGradients, multi_stage, single_stage


def _curvature(method: methods.MethodConfig, settings, alpha: float | None) -> Attributor:
    damping = settings.damping
    if settings.is_multi_stage and method.factors:
        return multi_stage(method.name, settings.pretrained_factors, settings.finetuned_factors, alpha, damping.absolute, damping.relative, damping.finetuned)
    return single_stage(method.name, settings.factors, damping.absolute, damping.relative)


BUILDERS: dict[type[methods.MethodConfig], Callable[[methods.MethodConfig, object, float | None], Attributor]] = {
    methods.EKFAC: _curvature,
    methods.KFAC: _curvature,
    methods.Diagonal: _curvature,
    methods.Identity: lambda method, settings, alpha: single_stage("identity", None, None, methods.Damping().relative),
    methods.GradientDot: lambda method, settings, alpha: similarity.build_gradient_dot(),
    methods.GradientCosine: lambda method, settings, alpha: similarity.GradientCosine(squared=False),
    methods.CKA: lambda method, settings, alpha: similarity.GradientCosine(squared=True),
    methods.Representation: lambda method, settings, alpha: similarity.RepresentationSimilarity(method.layer),
    methods.TRAK: lambda method, settings, alpha: trak.build_trak(method, settings.damping, settings.train, settings.out),
    methods.BM25: lambda method, settings, alpha: text.TextRetrievalScores("bm25", method.index, method=method.variant),
    methods.Embedding: lambda method, settings, alpha: text.TextRetrievalScores("embedding", method.index, model=method.model),
    methods.Exact: lambda method, settings, alpha: inverse.build_solver_method(method, settings.damping),
    methods.CG: lambda method, settings, alpha: inverse.build_solver_method(method, settings.damping),
    methods.LiSSA: lambda method, settings, alpha: inverse.build_solver_method(method, settings.damping),
    methods.Arnoldi: lambda method, settings, alpha: inverse.build_solver_method(method, settings.damping),
}


def make_attributor(settings, alpha: float | None = None) -> Attributor:
    """The attributor of `settings.method` (a validated `ScoreSettings`); `alpha`: the multi-stage α the run uses."""
    method = settings.method
    attributor = BUILDERS[type(method)](method, settings, alpha)
    if isinstance(attributor, PreconditionedGradients):
        attributor.query_rank = settings.query_rank
    return attributor
