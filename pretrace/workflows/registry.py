"""Method configs → attributors: the influence methods of `pretrace.methods` and the baselines. Each method is
built from its own config (`pretrace.methods.config`) and the shared settings it reads: the stages' factor
folders, the damping and the multi-stage α the run resolved."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from pretrace.baselines import inverse, similarity, text, trak
from pretrace.methods import config as methods
from pretrace.methods.base import Attributor
from pretrace.methods.gradient import PreconditionedGradients, multi_stage, single_stage


def _factor_sources(settings, given: Mapping[str, Any]) -> dict[str, Any]:
    """Each factor setting's source: the object the Python API was handed, else the setting's folder."""
    return {name: given.get(name, getattr(settings, name)) for name in ("factors", "pretrained_factors", "finetuned_factors")}


def _curvature(method: methods.MethodConfig, settings, alpha: float | None, given: Mapping[str, Any]) -> Attributor:
    damping = settings.damping
    factors = _factor_sources(settings, given)
    if settings.is_multi_stage and method.factors:
        return multi_stage(method.name, factors["pretrained_factors"], factors["finetuned_factors"], alpha, damping.absolute, damping.relative, damping.finetuned)
    return single_stage(method.name, factors["factors"], damping.absolute, damping.relative)


def _refined(method: methods.RefinedEKFAC, settings, alpha: float | None, given: Mapping[str, Any]) -> Attributor:
    return inverse.refined_method(method, settings.damping, alpha=alpha if settings.is_multi_stage else None, **_factor_sources(settings, given))


# each builder: (the method's config, the run's settings, its α, the factors given in memory) -> attributor
BUILDERS: dict[type[methods.MethodConfig], Callable[[methods.MethodConfig, Any, float | None, Mapping[str, Any]], Attributor]] = {
    methods.EKFAC: _curvature,
    methods.KFAC: _curvature,
    methods.Diagonal: _curvature,
    methods.Identity: lambda method, settings, alpha, given: single_stage("identity", None, None, methods.Damping().relative),
    methods.GradientDot: lambda method, settings, alpha, given: similarity.build_gradient_dot(),
    methods.GradientCosine: lambda method, settings, alpha, given: similarity.GradientCosine(squared=False),
    methods.CKA: lambda method, settings, alpha, given: similarity.GradientCosine(squared=True),
    methods.Representation: lambda method, settings, alpha, given: similarity.RepresentationSimilarity(method.layer),
    methods.TRAK: lambda method, settings, alpha, given: trak.build_trak(method, settings.damping, settings.train, settings.out),
    methods.BM25: lambda method, settings, alpha, given: text.TextRetrievalScores("bm25", method.index, method=method.variant),
    methods.Embedding: lambda method, settings, alpha, given: text.TextRetrievalScores("embedding", method.index, model=method.model),
    methods.Exact: lambda method, settings, alpha, given: inverse.build_solver_method(method, settings.damping),
    methods.CG: lambda method, settings, alpha, given: inverse.build_solver_method(method, settings.damping),
    methods.RefinedEKFAC: _refined,
    methods.LiSSA: lambda method, settings, alpha, given: inverse.build_solver_method(method, settings.damping),
    methods.Arnoldi: lambda method, settings, alpha, given: inverse.build_solver_method(method, settings.damping),
}


def make_attributor(settings, alpha: float | None = None, given: Mapping[str, Any] | None = None) -> Attributor:
    """The attributor of `settings.method` (a validated `ScoreSettings`); `alpha`: the multi-stage α the run uses;
    `given`: factors the Python API was handed instead of the settings' folders."""
    method = settings.method
    attributor = BUILDERS[type(method)](method, settings, alpha, given or {})
    if isinstance(attributor, PreconditionedGradients):
        attributor.query_rank = settings.query_rank
    return attributor
