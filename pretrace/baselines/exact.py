"""Exact influence: the dense damped curvature (C + λI) over all tracked parameters, factorised once.

The reference every approximation (EK-FAC, CG, LiSSA, Arnoldi) is measured against, and only feasible for
small parameter counts: building C takes P curvature-vector products and P² numbers of memory.
"""

from __future__ import annotations

import torch

from pretrace.baselines.curvature_products import CurvatureProducts, FlatInverse, damping_value
from pretrace.curvature.operators import check_damping
from pretrace.errors import PretraceError
from pretrace.progress import progress_bar

COLUMNS_PER_CALL = 512


def dense_curvature(products: CurvatureProducts, progress: bool = False) -> torch.Tensor:
    """C as a `[P, P]` matrix, from products with blocks of unit vectors (symmetrised against rounding)."""
    size = products.num_parameters
    matrix = torch.empty(size, size, dtype=products.dtype, device=products.device)
    for start in progress_bar(range(0, size, COLUMNS_PER_CALL), desc="dense curvature", unit="block", enabled=progress):
        stop = min(size, start + COLUMNS_PER_CALL)
        units = torch.zeros(stop - start, size, dtype=products.dtype, device=products.device)
        units[:, start:stop] = torch.eye(stop - start, dtype=products.dtype, device=products.device)
        matrix[start:stop] = products(units)
    return (matrix + matrix.T) / 2


class ExactInverse(FlatInverse):
    """(C + λI)⁻¹ by Cholesky (LU when the damped matrix is not positive definite, as a Hessian may be)."""

    def __init__(self, products: CurvatureProducts, damping: float | None = None, damping_factor: float = 0.1,
                 max_parameters: int = 20_000, progress: bool = False):
        check_damping(damping, damping_factor)  # before the expensive part
        size = products.num_parameters
        if size > max_parameters:
            raise PretraceError(
                f"--method exact builds a dense {size}×{size} curvature over the {size} tracked parameters, more than "
                f"--exact-max-parameters={max_parameters}; track fewer modules (--preset mlp, --modules REGEX), raise the "
                "limit if memory allows, or use --method cg."
            )
        matrix = dense_curvature(products, progress)
        super().__init__(products, damping_value(damping, damping_factor, lambda: float(matrix.diagonal().mean())))
        matrix.diagonal().add_(self.damping)
        factor, info = torch.linalg.cholesky_ex(matrix)
        self.positive_definite = int(info) == 0
        if self.positive_definite:
            self._solve = lambda columns: torch.cholesky_solve(columns, factor)
        else:
            lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
            if int(info) != 0:
                raise PretraceError(f"the damped curvature is singular (damping {self.damping:g}); increase --damping or --damping-factor.")
            self._solve = lambda columns: torch.linalg.lu_solve(lu, pivots, columns)

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        return self._solve(vectors.T).T

    def describe(self) -> dict:
        return {**super().describe(), "positive_definite": self.positive_definite}
