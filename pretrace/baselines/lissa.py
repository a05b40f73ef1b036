"""LiSSA (Agarwal et al., 2017; as used for influence by Koh & Liang, 2017): a stochastic Neumann series for
(C + λI)⁻¹ v.

With A = C + λI and a scale s > 0 such that 0 < eigenvalues of A/s < 2, (A/s)⁻¹ = Σ_j (I − A/s)^j, so

    x₀ = v,   x_t = v + (I − A_t/s) x_{t−1} = v + (1 − λ/s) x_{t−1} − C_t x_{t−1} / s,   (A/s)⁻¹ v ≈ x_T,

and A⁻¹ v ≈ x_T / s, where C_t is the curvature of one random fitting batch (--batch-size documents; batches
are drawn without replacement, epoch after epoch). `repeats` independent runs are averaged. The series
converges when s exceeds half of every batch's largest eigenvalue of A and needs about κ·ln(1/ε) steps
for accuracy ε (κ: condition number of A): damping sets how deep it must go. The default scale is
max over (at most `SCALE_BATCHES`) batches of their largest |eigenvalue| plus λ, from short Arnoldi runs,
which keeps every step contractive with a factor-two margin. A growing iterate (‖x_t‖ > (t+1)‖v‖, which a
contractive recursion cannot reach) stops the solve with an error instead of returning garbage.
"""

from __future__ import annotations

import torch

from pretrace.baselines.arnoldi import ritz_pairs
from pretrace.baselines.curvature_products import CurvatureProducts, FlatInverse, damping_value
from pretrace.errors import PretraceError
from pretrace.progress import progress_bar

SCALE_BATCHES = 10
SCALE_ITERATIONS = 20


def _batch_order(count: int, steps: int, generator: torch.Generator) -> list[int]:
    order: list[int] = []
    while len(order) < steps:
        order.extend(torch.randperm(count, generator=generator).tolist())
    return order[:steps]


class LiSSA(FlatInverse):
    """x ≈ (C + λI)⁻¹ v by the recursion above, averaged over `repeats` runs of `depth` steps."""

    def __init__(self, products: CurvatureProducts, depth: int = 1000, repeats: int = 1, scale: float | None = None,
                 damping: float | None = None, damping_factor: float = 0.1, seed: int = 0, progress: bool = False):
        if depth < 1 or repeats < 1:
            raise PretraceError(f"--lissa-depth and --lissa-repeats must be at least 1, got {depth} and {repeats}.")
        if scale is not None and not scale > 0:
            raise PretraceError(f"--lissa-scale must be positive, got {scale}.")
        super().__init__(products, damping_value(damping, damping_factor, lambda: products.mean_eigenvalue(seed)))
        self.depth, self.repeats, self.seed, self.progress = depth, repeats, seed, progress
        self.scale = float(scale) if scale is not None else self.automatic_scale()

    def automatic_scale(self) -> float:
        """Largest |eigenvalue| over a sample of single-batch curvatures, plus λ."""
        batches = self.products.batches
        chosen = _batch_order(len(batches), min(len(batches), SCALE_BATCHES), torch.Generator().manual_seed(self.seed))
        top = max(float(ritz_pairs(self.products, SCALE_ITERATIONS, self.seed, [batches[i]])[0][0].abs()) for i in chosen)
        return top + self.damping

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        batches, s = self.products.batches, self.scale
        bound = vectors.norm(dim=1) * (1 + 1e-6)
        total = torch.zeros_like(vectors)
        bar = progress_bar(total=self.depth * self.repeats, desc="LiSSA", unit="step", enabled=self.progress)
        for _ in range(self.repeats):
            x = vectors.clone()
            for step, index in enumerate(_batch_order(len(batches), self.depth, generator), start=2):
                x = vectors + (1 - self.damping / s) * x - self.products(x, [batches[index]]) / s
                if not torch.isfinite(x).all() or (x.norm(dim=1) > step * bound).any():
                    raise PretraceError(f"LiSSA diverged (the recursion stopped contracting at scale {s:g}); "
                                        "raise --lissa-scale or the damping.")
                bar.update()
            total += x / s
        bar.close()
        return total / self.repeats

    def describe(self) -> dict:
        return {**super().describe(), "depth": self.depth, "repeats": self.repeats, "scale": self.scale, "seed": self.seed}
