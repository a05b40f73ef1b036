"""Conjugate gradient: (C + λI) x = v solved for every query, with exact curvature-vector products.

Standard CG from x₀ = 0 (r₀ = p₀ = v):  α = rᵀr / pᵀAp,  x ← x + αp,  r ← r − αAp,  β = r'ᵀr' / rᵀr,
p ← r' + βp,  with A = C + λI. Queries run side by side (one product pass serves all unconverged ones)
but each has its own α, β and stopping point: ‖r‖ ≤ tolerance · ‖v‖ or the iteration cap. CG needs A
positive definite; with an indefinite Hessian a direction of non-positive curvature stops that query
(reported as `negative_curvature`).

Preconditioned (ASTRA's refinement of EK-FAC): with M ≈ A⁻¹ symmetric positive definite, z = M r replaces r in
α = rᵀz / pᵀAp, β = r'ᵀz' / rᵀz and p ← z' + βp. With M the damped EK-FAC inverse, the first iterate is
EK-FAC's own solution rescaled by its optimal step, and each further iteration corrects it with one exact
curvature product, so a few iterations close most of EK-FAC's gap to the exact inverse.

Shared subspace (`shared_subspace=True`): the queries solved together share one Krylov space. After the last
iteration every query's solution is the Galerkin one over the span of all queries' search directions P,
x = P (Pᵀ A P)⁺ Pᵀ v, from the products A P the iterations already made: no further product, and in the energy norm
never worse than the query's own iterate (its own directions are in the span). Curvature directions the
preconditioner gets wrong are largely common to all queries, so each query gains what the others explored; the
price is holding 2 × queries × iterations vectors, and a query's solution then depends on the queries beside it.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from pretrace.baselines.curvature_products import CurvatureProducts, FlatInverse, damping_value
from pretrace.curvature.operators import Preconditioner
from pretrace.errors import PretraceError
from pretrace.progress import progress_bar


class ConjugateGradient(FlatInverse):
    """x ≈ (C + λI)⁻¹ v by CG; `last_solve` records each query's iterations and final relative residual.

    `preconditioner(λ)`, when given, builds M ≈ (C + λI)⁻¹ once λ is known (e.g. the EK-FAC inverse damped by λ)."""

    def __init__(self, products: CurvatureProducts, max_iterations: int = 100, tolerance: float = 1e-4,
                 damping: float | None = None, damping_factor: float = 0.1, seed: int = 0, progress: bool = False,
                 preconditioner: Callable[[float], Preconditioner] | None = None, shared_subspace: bool = False):
        if max_iterations < 1:
            raise PretraceError(f"--iterations must be at least 1, got {max_iterations}.")
        if not tolerance > 0:
            raise PretraceError(f"--tolerance must be positive, got {tolerance}.")
        super().__init__(products, damping_value(damping, damping_factor, lambda: products.mean_eigenvalue(seed)))
        self.max_iterations, self.tolerance, self.progress = max_iterations, tolerance, progress
        self.preconditioner = None if preconditioner is None else preconditioner(self.damping)
        self.shared_subspace = shared_subspace
        self.last_solve: dict = {}

    def _precondition(self, residual: torch.Tensor) -> torch.Tensor:
        """z = M r (r itself without a preconditioner)."""
        if self.preconditioner is None:
            return residual
        applied = self.preconditioner.apply(self.layout.unflatten(residual))
        return self.layout.flatten(applied).to(residual.dtype)

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        x = torch.zeros_like(vectors)
        residual = vectors.clone()
        preconditioned = self._precondition(residual)
        direction = preconditioned.clone()
        squared = (residual * preconditioned).sum(1)  # rᵀz: rᵀr without a preconditioner
        target = self.tolerance * vectors.norm(dim=1)
        norms = (residual * residual).sum(1)  # ‖r‖², what stopping reads
        iterations = torch.zeros(len(vectors), dtype=torch.long, device=vectors.device)
        negative = torch.zeros(len(vectors), dtype=torch.bool, device=vectors.device)
        active = norms.sqrt() > target
        explored: list[tuple[torch.Tensor, torch.Tensor]] = []  # (directions, their products): the shared subspace
        bar = progress_bar(total=self.max_iterations, desc="conjugate gradient", unit="step", enabled=self.progress)
        for step in range(self.max_iterations):
            rows = active.nonzero().flatten()
            if len(rows) == 0:
                break
            p = direction[rows]
            image = self.products(p) + self.damping * p
            curvature = (p * image).sum(1)
            bad = curvature <= 0
            negative[rows[bad]] = True
            rows, p, image, curvature = rows[~bad], p[~bad], image[~bad], curvature[~bad]
            if self.shared_subspace:
                explored.append((p, image))
            alpha = squared[rows] / curvature
            x[rows] += alpha[:, None] * p
            residual[rows] -= alpha[:, None] * image
            if step + 1 < self.max_iterations:  # the last direction would never be used: spare its preconditioning
                z = self._precondition(residual[rows])
                updated = (residual[rows] * z).sum(1)
                direction[rows] = z + (updated / squared[rows])[:, None] * p
                squared[rows] = updated
            norms[rows] = (residual[rows] * residual[rows]).sum(1)
            iterations[rows] += 1
            active = (norms.sqrt() > target) & ~negative
            bar.update()
        bar.close()
        shared = {}
        if self.shared_subspace and explored:
            x, residual, dimensions = galerkin(vectors, torch.cat([p for p, _ in explored]), torch.cat([a for _, a in explored]))
            norms = (residual * residual).sum(1)
            shared = {"shared_subspace_dimensions": dimensions}
        relative = (norms.sqrt() / vectors.norm(dim=1).clamp(min=torch.finfo(vectors.dtype).tiny)).cpu()
        converged = (relative <= self.tolerance).tolist()
        self.last_solve = {"iterations": iterations.tolist(), "relative_residual": relative.tolist(), "converged": converged,
                           "negative_curvature": negative.tolist(), **shared}
        if not all(converged):
            warnings.warn(f"CG: {converged.count(False)} of {len(converged)} queries did not reach --tolerance {self.tolerance:g} "
                          f"within {self.max_iterations} iterations (or met non-positive curvature); see the hyperparameters' last_solve.",
                          stacklevel=2)
        return x

    def describe(self) -> dict:
        preconditioner = {} if self.preconditioner is None else {"preconditioner": self.preconditioner.describe()}
        return {**super().describe(), "max_iterations": self.max_iterations, "tolerance": self.tolerance, **preconditioner,
                "last_solve": self.last_solve}


def galerkin(vectors: torch.Tensor, directions: torch.Tensor, images: torch.Tensor, cutoff: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`(x, v − A x, rank)` with x the energy-optimal solution of A x = v within the span of the rows of `directions`
    (`images`: their products with A), for every row v of `vectors`. In float64 on an orthonormal basis of the span
    (singular values below `cutoff` × the largest dropped: several queries' directions can be nearly dependent),
    so the small system is no worse conditioned than A itself."""
    p, ap = directions.double(), images.double()
    left, singular, _ = torch.linalg.svd(p, full_matrices=False)
    kept = singular > cutoff * singular.max()
    transform = left[:, kept].T / singular[kept, None]
    basis, basis_images = transform @ p, transform @ ap  # orthonormal rows spanning P, and A times them
    gram = basis @ basis_images.T
    weights = torch.linalg.solve((gram + gram.T) / 2, basis @ vectors.double().T).T
    return (weights @ basis).to(vectors.dtype), (vectors.double() - weights @ basis_images).to(vectors.dtype), int(kept.sum())
