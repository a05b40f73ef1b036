"""Curvature approximations (EK-FAC and relatives): fitting, storing, and applying their damped inverses."""

from pretrace.curvature.factors import Factors, ModuleFactors
from pretrace.curvature.fit import FitSettings, fit_factors
from pretrace.curvature.operators import (
    Chain,
    Diagonal,
    EKFAC,
    Identity,
    KFAC,
    Preconditioner,
    Scaled,
)
from pretrace.curvature.placement import PlacedPreconditioner

__all__ = [
    "Chain",
    "Diagonal",
    "EKFAC",
    "FitSettings",
    "Factors",
    "Identity",
    "KFAC",
    "ModuleFactors",
    "PlacedPreconditioner",
    "Preconditioner",
    "Scaled",
    "fit_factors",
]
