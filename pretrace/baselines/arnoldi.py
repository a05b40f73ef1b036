"""Arnoldi influence (Schioppa et al., 2022): the curvature's top eigenpairs from a Krylov basis, and
influence restricted to their span.

n Arnoldi steps from a random unit vector build an orthonormal basis Q_n of the Krylov space
span{q, Cq, …, C^{n-1}q} and the projection H_n = Q_nᵀ C Q_n (tridiagonal up to rounding, as C is
symmetric). Eigenpairs (μ_i, u_i) of H_n give Ritz pairs (μ_i, Q_n u_i) whose extreme eigenvalues converge
first. The k of largest magnitude (the paper's choice) are kept, and

    P = V diag(1 / (μ_i + λ)) Vᵀ,     V = [Q_n u_1 … Q_n u_k]  (P × k, orthonormal columns).

Damping λ IS added here (the resolved --damping / --damping-factor, like every other method); pass
--damping 0 for the paper's undamped 1/μ_i. Directions outside the top-k subspace get zero weight.
Each basis vector is re-orthogonalised twice against all earlier ones, so rounding does not create
spurious copies of converged eigenvalues. The basis (n × P) lives on the model's device.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pretrace.baselines.curvature_products import CurvatureProducts, FlatInverse, damping_value
from pretrace.data.batching import TokenBatch
from pretrace.errors import PretraceError
from pretrace.progress import progress_bar

BREAKDOWN = 1e-10  # a new direction shorter than this (relative to its image) means the Krylov space is complete


def ritz_pairs(products: CurvatureProducts, iterations: int, seed: int = 0, batches: Sequence[TokenBatch] | None = None,
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues `[m]` (by decreasing magnitude) and orthonormal eigenvectors `[m, P]` of C projected on the
    Krylov space of `iterations` steps (m ≤ iterations when the space closes early); C over `batches` if given."""
    if iterations < 1:
        raise PretraceError(f"Arnoldi needs at least one iteration, got {iterations}.")
    size = products.num_parameters
    iterations = min(iterations, size)
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(size, generator=generator, dtype=torch.float64).to(products.device, products.dtype)
    basis = torch.zeros(iterations + 1, size, dtype=products.dtype, device=products.device)
    basis[0] = start / start.norm()
    hessenberg = torch.zeros(iterations + 1, iterations, dtype=torch.float64)
    steps = iterations
    for j in progress_bar(range(iterations), desc="Arnoldi", unit="step", enabled=progress):
        w = products(basis[j : j + 1], batches)[0]
        scale = float(w.norm())
        for _ in range(2):  # "twice is enough" Gram-Schmidt
            coefficients = basis[: j + 1] @ w
            w = w - coefficients @ basis[: j + 1]
            hessenberg[: j + 1, j] += coefficients.double().cpu()
        norm = float(w.norm())
        hessenberg[j + 1, j] = norm
        if norm <= BREAKDOWN * max(scale, 1e-300):
            steps = j + 1
            break
        basis[j + 1] = w / norm
    projected = hessenberg[:steps, :steps]
    values, vectors = torch.linalg.eigh((projected + projected.T) / 2)
    order = values.abs().argsort(descending=True)
    return values[order], vectors[:, order].T.to(products.device, products.dtype) @ basis[:steps]


class ArnoldiInverse(FlatInverse):
    """P = V diag(1/(μ_i + λ)) Vᵀ over the top-`rank` Ritz pairs of `iterations` Arnoldi steps."""

    def __init__(self, products: CurvatureProducts, rank: int = 20, iterations: int = 100, damping: float | None = None,
                 damping_factor: float = 0.1, seed: int = 0, progress: bool = False):
        if rank < 1 or iterations < rank:
            raise PretraceError(f"Arnoldi needs 1 ≤ --arnoldi-rank ≤ --arnoldi-iterations, got rank {rank} and {iterations} iterations.")
        super().__init__(products, damping_value(damping, damping_factor, lambda: products.mean_eigenvalue(seed)))
        values, vectors = ritz_pairs(products, iterations, seed, progress=progress)
        self.eigenvalues, self.eigenvectors = values[:rank], vectors[:rank]
        self.iterations, self.seed = iterations, seed
        shifted = self.eigenvalues + self.damping
        if (shifted.abs() <= 1e-12 * values.abs().max()).any():
            raise PretraceError("a kept eigenvalue plus the damping is zero, so the inverse is undefined; change --damping.")
        self.inverse = (1.0 / shifted).to(self.device, self.dtype)

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        return ((vectors @ self.eigenvectors.T) * self.inverse) @ self.eigenvectors

    def describe(self) -> dict:
        return {**super().describe(), "rank": len(self.eigenvalues), "iterations": self.iterations, "seed": self.seed,
                "eigenvalues": self.eigenvalues.tolist(), "damping_added": True}
