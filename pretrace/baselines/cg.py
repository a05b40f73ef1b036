"""Conjugate gradient: (C + λI) x = v solved for every query, with exact curvature-vector products.

Standard CG from x₀ = 0 (r₀ = p₀ = v):  α = rᵀr / pᵀAp,  x ← x + αp,  r ← r − αAp,  β = r'ᵀr' / rᵀr,
p ← r' + βp,  with A = C + λI. Queries run side by side (one product pass serves all unconverged ones)
but each has its own α, β and stopping point: ‖r‖ ≤ tolerance · ‖v‖ or the iteration cap. CG needs A
positive definite; with an indefinite Hessian a direction of non-positive curvature stops that query
(reported as `negative_curvature`).
"""

from __future__ import annotations

import warnings

import torch
from tqdm.auto import tqdm

from pretrace.baselines.curvature_products import CurvatureProducts, FlatInverse, damping_value
from pretrace.errors import PretraceError


class ConjugateGradient(FlatInverse):
    """x ≈ (C + λI)⁻¹ v by CG; `last_solve` records each query's iterations and final relative residual."""

    def __init__(self, products: CurvatureProducts, max_iterations: int = 100, tolerance: float = 1e-4,
                 damping: float | None = None, damping_factor: float = 0.1, seed: int = 0, progress: bool = False):
        if max_iterations < 1:
            raise PretraceError(f"--iterations must be at least 1, got {max_iterations}.")
        if not tolerance > 0:
            raise PretraceError(f"--tolerance must be positive, got {tolerance}.")
        super().__init__(products, damping_value(damping, damping_factor, lambda: products.mean_eigenvalue(seed)))
        self.max_iterations, self.tolerance, self.progress = max_iterations, tolerance, progress
        self.last_solve: dict = {}

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        x = torch.zeros_like(vectors)
        residual, direction = vectors.clone(), vectors.clone()
        squared = (residual * residual).sum(1)
        target = self.tolerance * vectors.norm(dim=1)
        iterations = torch.zeros(len(vectors), dtype=torch.long, device=vectors.device)
        negative = torch.zeros(len(vectors), dtype=torch.bool, device=vectors.device)
        active = squared.sqrt() > target
        bar = tqdm(total=self.max_iterations, desc="conjugate gradient", unit="step", disable=not self.progress)
        for _ in range(self.max_iterations):
            rows = active.nonzero().flatten()
            if len(rows) == 0:
                break
            p = direction[rows]
            image = self.products(p) + self.damping * p
            curvature = (p * image).sum(1)
            bad = curvature <= 0
            negative[rows[bad]] = True
            rows, p, image, curvature = rows[~bad], p[~bad], image[~bad], curvature[~bad]
            alpha = squared[rows] / curvature
            x[rows] += alpha[:, None] * p
            residual[rows] -= alpha[:, None] * image
            updated = (residual[rows] * residual[rows]).sum(1)
            direction[rows] = residual[rows] + (updated / squared[rows])[:, None] * p
            squared[rows] = updated
            iterations[rows] += 1
            active = (squared.sqrt() > target) & ~negative
            bar.update()
        bar.close()
        relative = (squared.sqrt() / vectors.norm(dim=1).clamp(min=torch.finfo(vectors.dtype).tiny)).cpu()
        converged = (relative <= self.tolerance).tolist()
        self.last_solve = {"iterations": iterations.tolist(), "relative_residual": relative.tolist(), "converged": converged,
                           "negative_curvature": negative.tolist()}
        if not all(converged):
            warnings.warn(f"CG: {converged.count(False)} of {len(converged)} queries did not reach --tolerance {self.tolerance:g} "
                          f"within {self.max_iterations} iterations (or met non-positive curvature); see the hyperparameters' last_solve.",
                          stacklevel=2)
        return x

    def describe(self) -> dict:
        return {**super().describe(), "max_iterations": self.max_iterations, "tolerance": self.tolerance, "last_solve": self.last_solve}
