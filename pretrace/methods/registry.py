"""Method names → attributors. Each builder takes the score settings (see `pretrace.workflows.score`)."""

from __future__ import annotations

from typing import Callable

from pretrace.errors import PretraceError
from pretrace.methods.base import Attributor
from pretrace.methods.gradient import multi_stage, single_stage


def _curvature(kind: str) -> Callable:
    def build(settings) -> Attributor:
        if settings.is_multi_stage and kind != "identity":
            return multi_stage(kind, settings.pretrained_factors, settings.finetuned_factors, settings.alpha,
                               settings.damping, settings.damping_factor, settings.finetuned_damping)
        return single_stage(kind, settings.factors, settings.damping, settings.damping_factor)

    return build


METHODS: dict[str, tuple[str, Callable]] = {
    "ekfac": ("EK-FAC inverse (eigenvalue-corrected Kronecker factors)", _curvature("ekfac")),
    "kfac": ("K-FAC inverse (Kronecker eigenvalues, no correction)", _curvature("kfac")),
    "diagonal": ("diagonal Fisher inverse (factors fitted with --diagonal)", _curvature("diagonal")),
    "identity": ("no preconditioning: gradient dot product", _curvature("identity")),
}


def make_attributor(settings) -> Attributor:
    if settings.method not in METHODS:
        raise PretraceError(f"unknown --method {settings.method!r}; choose one of {sorted(METHODS)}.")
    return METHODS[settings.method][1](settings)
