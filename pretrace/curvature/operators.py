"""Preconditioners: symmetric linear operators on per-module gradients `[Q, d_out, d_in']`.

A solver is an operator and operators compose, so single-stage influence is one operator and
multi-stage influence is `Scaled(Chain(ft_inverse, pt_inverse), α)`. Every operator returns new
tensors; factors (Λ in particular) are never modified by damping.

What an operator can do beyond `apply` is declared, never probed: `module_wise` (block-diagonal over
modules), `kronecker_eigenbasis` (per module, P v comes out in a Kronecker eigenbasis: `eigenbasis` names it
and `apply_factored_in_eigenbasis` / `apply_in_eigenbasis` form it, the cheap route `pretrace.scores.queries`
takes for query weights; EK-FAC/K-FAC inverses are diagonal there, and a chain of them ends in its last
operator's basis) and `is_identity` (P = I: query weights are the raw token factors, exactly).
Wrappers (`Scaled`, `pretrace.curvature.placement.PlacedPreconditioner`) pass on their inner operator's.
"""

from __future__ import annotations

import math

from typing import Sequence

import torch

from pretrace.curvature.factors import Factors
from pretrace.errors import PretraceError

Gradients = dict[str, torch.Tensor]


class Preconditioner:
    """Maps gradients v to P v for a symmetric P (typically a damped inverse curvature)."""

    # True when P is block-diagonal over modules, so each module can be mapped on its own (and composed
    # operators can stream module by module instead of holding every intermediate gradient at once).
    module_wise: bool = False
    # True when, per module, P v can be formed in a Kronecker eigenbasis (Q_G ⊗ Q_A)ᵀ P v: then `eigenbasis`,
    # `apply_factored_in_eigenbasis` and `apply_in_eigenbasis` work, and query weights can stay in that eigenbasis.
    kronecker_eigenbasis: bool = False
    # True only for P = I (not a scaled or placed one): query weights can be kept as their exact token factors.
    is_identity: bool = False

    def apply(self, grads: Gradients) -> Gradients:
        raise NotImplementedError

    def eigenbasis(self, name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_A `[d_in', d_in']`, Q_G `[blocks, block, block]`) on `device`: a module's Kronecker eigenbases."""
        raise PretraceError(f"{type(self).__name__} is not diagonal in a Kronecker eigenbasis (kronecker_eigenbasis is False).")

    def apply_factored_in_eigenbasis(self, name: str, output_gradients: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        """`[Q, d_out, d_in']`: (Q_G ⊗ Q_A)ᵀ P v for v = Σ_t g_t a_tᵀ given as `[Q, T, d_out]`, `[Q, T, d_in']`."""
        raise PretraceError(f"{type(self).__name__} is not diagonal in a Kronecker eigenbasis (kronecker_eigenbasis is False).")

    def apply_in_eigenbasis(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """`[Q, d_out, d_in']`: (Q_G ⊗ Q_A)ᵀ P v for a dense gradient v in the parameter basis."""
        raise PretraceError(f"{type(self).__name__} is not diagonal in a Kronecker eigenbasis (kronecker_eigenbasis is False).")

    def describe(self) -> dict:
        return {"type": type(self).__name__}


class Identity(Preconditioner):
    """P = I: influence becomes the plain gradient dot product."""

    module_wise = True
    is_identity = True

    def apply(self, grads: Gradients) -> Gradients:
        return dict(grads)


class Scaled(Preconditioner):
    def __init__(self, inner: Preconditioner, factor: float):
        self.inner, self.factor = inner, float(factor)

    @property
    def module_wise(self) -> bool:
        return self.inner.module_wise

    @property
    def kronecker_eigenbasis(self) -> bool:
        return self.inner.kronecker_eigenbasis

    def apply(self, grads: Gradients) -> Gradients:
        out = self.inner.apply(grads)
        for name, g in out.items():  # replaced one by one: one module's extra copy at a time, never the inner input's
            out[name] = g * self.factor
        return out

    def eigenbasis(self, name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.eigenbasis(name, device, dtype)

    def apply_factored_in_eigenbasis(self, name: str, output_gradients: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        return self.inner.apply_factored_in_eigenbasis(name, output_gradients, activations) * self.factor

    def apply_in_eigenbasis(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return self.inner.apply_in_eigenbasis(name, grad) * self.factor

    def describe(self) -> dict:
        return {"type": "Scaled", "factor": self.factor, "inner": self.inner.describe()}


class Chain(Preconditioner):
    """Apply operators in order: Chain([A, B]).apply(v) = B(A(v))."""

    def __init__(self, operators: Sequence[Preconditioner]):
        self.operators = list(operators)

    @property
    def module_wise(self) -> bool:
        return all(op.module_wise for op in self.operators)

    def apply(self, grads: Gradients) -> Gradients:
        if self.module_wise:  # each module through every operator in turn: no full intermediate copies
            return {name: self._apply_all({name: g})[name] for name, g in grads.items()}
        return self._apply_all(grads)

    def _apply_all(self, grads: Gradients) -> Gradients:
        for op in self.operators:
            grads = op.apply(grads)
        return grads

    @property
    def kronecker_eigenbasis(self) -> bool:
        """A chain of eigenbasis operators ends in its last operator's eigenbasis (not diagonal there, but
        query weights only need to be expressed in it): each step rotates from one basis to the next once."""
        return bool(self.operators) and all(op.kronecker_eigenbasis for op in self.operators)

    def eigenbasis(self, name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.operators[-1].eigenbasis(name, device, dtype)

    def _onwards(self, name: str, rotated: torch.Tensor) -> torch.Tensor:
        """The first operator's output (in its eigenbasis) through the others, ending in the last one's."""
        device, dtype = rotated.device, rotated.dtype
        for previous, op in zip(self.operators, self.operators[1:]):
            rotated = op.apply_in_eigenbasis(name, from_eigenbasis(rotated, *previous.eigenbasis(name, device, dtype)))
        return rotated

    def apply_factored_in_eigenbasis(self, name: str, output_gradients: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        return self._onwards(name, self.operators[0].apply_factored_in_eigenbasis(name, output_gradients, activations))

    def apply_in_eigenbasis(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return self._onwards(name, self.operators[0].apply_in_eigenbasis(name, grad))

    def describe(self) -> dict:
        return {"type": "Chain", "operators": [op.describe() for op in self.operators]}


def check_damping(damping: float | None, damping_factor: float | None) -> None:
    """The one damping rule of the library's inverses (EK-FAC and kin, the exact-curvature solvers, TRAK's kernel):
    λ finite and ≥ 0, given (`damping`) or relative to the mean eigenvalue (`damping_factor`). λ = 0 leaves the
    inverse undamped, which only a full-rank curvature survives; the settings of `pretrace score` ask λ > 0."""
    for name, value in (("damping", damping), ("damping factor", None if damping is not None else damping_factor)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise PretraceError(f"{name} must be finite and non-negative (0: undamped, full-rank curvature only), got {value}.")


class _Damped(Preconditioner):
    """Module-wise inverse with damping λ: absolute if given, else `damping_factor` × the module's mean eigenvalue."""

    module_wise = True

    def __init__(self, factors: Factors, damping: float | None = None, damping_factor: float = 0.1):
        check_damping(damping, damping_factor)
        self.factors, self.damping, self.damping_factor = factors, damping, damping_factor
        self._cache: dict[tuple[str, torch.device, torch.dtype], tuple] = {}

    def module_damping(self, name: str) -> float:
        if self.damping is not None:
            return float(self.damping)
        return self.damping_factor * float(self.eigenvalues(name).double().mean())

    def eigenvalues(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _module(self, name: str):
        if name not in self.factors.modules:
            raise PretraceError(f"the factors have no module {name!r}; fit them with the same module selection.")
        return self.factors.modules[name]

    def apply(self, grads: Gradients) -> Gradients:
        return {name: self.apply_module(name, g) for name, g in grads.items()}

    def describe(self) -> dict:
        return {"type": type(self).__name__, "damping": self.damping, "damping_factor": None if self.damping is not None else self.damping_factor}


class _EigenbasisInverse(_Damped):
    """(Q_A ⊗ Q_G) diag(eigenvalues + λ)⁻¹ (Q_A ⊗ Q_G)ᵀ, block-diagonal over output-gradient blocks."""

    kronecker_eigenbasis = True

    def _prepared(self, name: str, device, dtype):
        key = (name, device, dtype)
        if key not in self._cache:
            mf = self._module(name)
            inverse = 1.0 / (self.eigenvalues(name).double() + self.module_damping(name))
            self._cache[key] = (
                mf.activation_eigenvectors.to(device, dtype),
                mf.gradient_eigenvectors.to(device, dtype),
                inverse.reshape(-1, inverse.shape[-1]).to(device, dtype),  # [d_out, d_in']
            )
        return self._cache[key]

    def apply_module(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        qa, qg, _ = self._prepared(name, grad.device, grad.dtype)
        return from_eigenbasis(self.apply_in_eigenbasis(name, grad), qa, qg)

    def apply_in_eigenbasis(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        qa, qg, inverse = self._prepared(name, grad.device, grad.dtype)
        return to_eigenbasis(grad, qa, qg) * inverse

    def eigenbasis(self, name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        qa, qg, _ = self._prepared(name, device, dtype)
        return qa, qg

    def apply_factored_in_eigenbasis(self, name: str, output_gradients: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        """`[Q, d_out, d_in']`: P v in the eigenbasis, for v = Σ_t g_t a_tᵀ given as `[Q, T, d_out]`, `[Q, T, d_in']`.

        Rotating the T factors costs T (d_out·block + d_in'²) instead of d_out·d_in' (block + d_in') for the
        dense gradient: far less when a sequence is shorter than the module is wide (the cheaper is taken)."""
        qa, qg, inverse = self._prepared(name, activations.device, activations.dtype)
        (t, d_out), d_in, block = output_gradients.shape[1:], qa.shape[0], qg.shape[1]
        if t * (d_out * block + d_in * d_in) <= d_out * d_in * (block + d_in):
            g, a = rotate_factors(output_gradients, activations, qa, qg)
            rotated = torch.einsum("qto,qti->qoi", g, a)
        else:
            rotated = to_eigenbasis(torch.einsum("qto,qti->qoi", output_gradients, activations), qa, qg)
        return rotated * inverse


def to_eigenbasis(grad: torch.Tensor, qa: torch.Tensor, qg: torch.Tensor) -> torch.Tensor:
    """(Q_G ⊗ Q_A)ᵀ v for `[Q, d_out, d_in']` gradients, Q_G block-diagonal `[blocks, block, block]`."""
    blocks = grad.reshape(grad.shape[0], qg.shape[0], qg.shape[1], grad.shape[-1])
    return (torch.einsum("kac,qkai->qkci", qg, blocks) @ qa).reshape(grad.shape)


def from_eigenbasis(rotated: torch.Tensor, qa: torch.Tensor, qg: torch.Tensor) -> torch.Tensor:
    """(Q_G ⊗ Q_A) v: the inverse of `to_eigenbasis`."""
    blocks = (rotated @ qa.T).reshape(rotated.shape[0], qg.shape[0], qg.shape[1], rotated.shape[-1])
    return torch.einsum("kac,qkci->qkai", qg, blocks).reshape(rotated.shape)


def rotate_factors(output_gradients: torch.Tensor, activations: torch.Tensor, qa: torch.Tensor, qg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token factors `[..., d_out]`, `[..., d_in']` in the eigenbasis: Σ_t g'_t a'_tᵀ = to_eigenbasis(Σ_t g_t a_tᵀ)."""
    blocks = output_gradients.reshape(*output_gradients.shape[:-1], qg.shape[0], qg.shape[1])
    g = torch.einsum("...ka,kac->...kc", blocks, qg).reshape(output_gradients.shape)
    return g, activations @ qa


class EKFAC(_EigenbasisInverse):
    """Eigenvalue-corrected K-FAC: eigenvalues Λ fitted from per-document gradients in the Kronecker eigenbasis."""

    def eigenvalues(self, name: str) -> torch.Tensor:
        return self._module(name).lambda_


class KFAC(_EigenbasisInverse):
    """Plain K-FAC: eigenvalues λ_G ⊗ λ_A scaled by tokens per document (tokens treated as independent)."""

    def eigenvalues(self, name: str) -> torch.Tensor:
        mf = self._module(name)
        scale = float(self.factors.metadata.get("tokens_per_document", 1.0))
        return scale * mf.gradient_eigenvalues.clamp(min=0)[:, :, None] * mf.activation_eigenvalues.clamp(min=0)[None, None, :]


class Diagonal(_Damped):
    """Diagonal of the per-document Fisher: needs factors fitted with --diagonal."""

    def eigenvalues(self, name: str) -> torch.Tensor:
        diagonal = self._module(name).diagonal
        if diagonal is None:
            raise PretraceError("these factors have no diagonal; re-fit with `pretrace fit --diagonal`.")
        return diagonal

    def apply_module(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        key = (name, grad.device, grad.dtype)
        if key not in self._cache:
            self._cache[key] = ((1.0 / (self.eigenvalues(name).double() + self.module_damping(name))).to(grad.device, grad.dtype),)
        return grad * self._cache[key][0]
