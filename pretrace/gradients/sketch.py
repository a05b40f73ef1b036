"""Kronecker-factored sketches of per-example gradients (LoGra-style): a linear module's gradient ∇W = Σ_t g_t a_tᵀ
is sketched as Π_out ∇W Π_inᵀ = Σ_t (Π_out g_t)(Π_in a_t)ᵀ, from each token's output gradient and input projected
separately, so a document's full gradient is never formed. The same Π sketch a query's preconditioned weights, and
⟨Π_out W Π_inᵀ, Π_out ∇W Π_inᵀ⟩ estimates ⟨W, ∇W⟩ without bias."""

from __future__ import annotations

import zlib

import torch

from pretrace.gradients.capture import CapturedBatch


def projections(shapes: dict[str, tuple[int, int]], dim: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module of shape (d_out, d_in'): (Π_out `[k_out, d_out]`, Π_in `[k_in, d_in']`), k_side = min(k, d_side),
    regenerated from the seed and the module's name (never stored).

    Each Π is √(d/k) times k random orthonormal rows (a Haar-random subspace), so E[ΠᵀΠ] = I, the sketched
    product is unbiased, and a side with k ≥ d is rotated exactly instead of approximated."""
    out = {}
    for name, sides in shapes.items():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        pair = []
        for d in sides:
            k = min(dim, d)
            gaussian = torch.randn(d, k, generator=generator, dtype=torch.float64)
            q, r = torch.linalg.qr(gaussian)
            pair.append((q * torch.sign(torch.diagonal(r))).T * (d / k) ** 0.5)  # sign fix: Haar-distributed
        out[name] = tuple(pair)
    return out


class KroneckerSketch:
    """One vector per example: every module's k_out × k_in sketch, flattened and concatenated in module order.

    `whitening` (optional, per module: (M_out, M_in), symmetric positive definite, e.g. the pre-trained curvature's
    Kronecker factors) moves the error of the estimate where it belongs: documents are sketched as
    Π_out M_out^-½ ∇W M_in^-½ Π_inᵀ and query weights as Π_out M_out^½ W M_in^½ Π_inᵀ, whose inner product still
    estimates ⟨W, ∇W⟩ without bias, now with an error of the order of ‖M^½ W M^½‖‖M^-½ ∇W M^-½‖ instead of
    ‖W‖‖∇W‖ (a preconditioned W lives in the directions of little curvature, where raw gradients are small). The
    matrices fold into the projections, so a document costs no more to sketch."""

    def __init__(self, shapes: dict[str, tuple[int, int]], dim: int, seed: int,
                 whitening: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.names = list(shapes)
        self.document_side, self.query_side = {}, {}
        for name, (p_out, p_in) in projections(shapes, dim, seed).items():
            if whitening is None or name not in whitening:
                self.document_side[name] = self.query_side[name] = (p_out, p_in)
                continue
            (out_half, out_inverse), (in_half, in_inverse) = (_roots(m) for m in whitening[name])
            self.document_side[name] = (p_out @ out_inverse, p_in @ in_inverse)
            self.query_side[name] = (p_out @ out_half, p_in @ in_half)
        self.width = sum(p_out.shape[0] * p_in.shape[0] for p_out, p_in in self.document_side.values())

    def query_tensors(self) -> dict[str, torch.Tensor]:
        """The query side's projections, by module: what `weights` needs, stored with a corpus store."""
        return {f"{name}.{side}": matrix for name, pair in self.query_side.items() for side, matrix in zip(("out", "in"), pair)}

    @classmethod
    def for_queries(cls, names: list[str], tensors: dict[str, torch.Tensor]) -> "KroneckerSketch":
        """A sketch that can only sketch query weights, from `query_tensors`."""
        sketch = cls.__new__(cls)
        sketch.names, sketch.document_side = list(names), {}
        sketch.query_side = {name: (tensors[f"{name}.out"], tensors[f"{name}.in"]) for name in names}
        sketch.width = sum(p_out.shape[0] * p_in.shape[0] for p_out, p_in in sketch.query_side.values())
        return sketch

    def documents(self, captured: CapturedBatch) -> torch.Tensor:
        """`[B, width]` float32 sketches of a batch's per-document gradients (padding has zero output gradients)."""
        parts = []
        for name in self.names:
            g, a = captured.output_gradients[name], captured.activations[name]
            p_out, p_in = (p.to(g.device, torch.float32) for p in self.document_side[name])
            parts.append(torch.einsum("btk,btl->bkl", g.float() @ p_out.T, a.float() @ p_in.T).flatten(1))
        return torch.cat(parts, dim=1)

    def weights(self, dense: dict[str, torch.Tensor]) -> torch.Tensor:
        """`[Q, width]` float64 sketches of per-module query weights `[Q, d_out, d_in']` (preconditioned gradients)."""
        parts = []
        for name in self.names:
            p_out, p_in = (p.to(dense[name].device) for p in self.query_side[name])
            parts.append((p_out @ dense[name].double() @ p_in.T).flatten(1))
        return torch.cat(parts, dim=1)


def _roots(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M^½ and M^-½ of a symmetric positive definite matrix, in float64."""
    values, vectors = torch.linalg.eigh(matrix.double())
    return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T
