"""Ground truth for multi-stage influence by actually retraining both stages.

A small problem whose two stages can be solved to numerical convergence: only the tracked linear
modules are trained (everything else frozen), pre-training minimises the mean document loss plus
w/2‖θ‖² (so H_pt is well defined and EK-FAC's damping for it is exactly w), and fine-tuning minimises
the mean completion loss plus α/2‖θ − θ_pt‖² (so H_ft's damping is exactly α). With a few hundred
parameters the exact Hessian is cheap, so both stages are solved by Newton's method in float64; a
retrain after removing one document reuses the base solution's factorised Hessian (the chord method:
the Hessian moves by O(1/N), so it still contracts fast), which makes one retrain a handful of gradient
evaluations. Removing document i and re-solving both stages measures the true change of a query's loss
that the influence formula predicts to first order: Δm ≈ score / N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call
from tqdm import tqdm

from pretrace.data.batching import TokenBatch, collate, encode_documents, encode_queries
from pretrace.data.records import Document, Query
from pretrace.errors import PretraceError
from pretrace.gradients.task import LanguageModelingTask
from pretrace.modeling.modules import TrackedModule


@dataclass
class ProximalProblem:
    model: torch.nn.Module
    tracked: list[TrackedModule]
    documents: TokenBatch
    pairs: TokenBatch
    queries: TokenBatch
    weight_decay: float
    alpha: float

    @classmethod
    def build(cls, model, tracked, tokenizer, documents: list[Document], pairs: list[Query], queries: list[Query], weight_decay: float, alpha: float, pad_id: int = 0):
        batch = lambda items: collate(list(items), pad_id)
        return cls(model, tracked, batch(encode_documents(tokenizer, documents, 512)), batch(encode_queries(tokenizer, pairs, 512)),
                   batch(encode_queries(tokenizer, queries, 512)), weight_decay, alpha)

    # -- parameters as one flat vector -------------------------------------------------------------
    def parameter_names(self) -> list[str]:
        names = []
        for t in self.tracked:
            names.append(f"{t.name}.weight")
            if t.has_bias:
                names.append(f"{t.name}.bias")
        return names

    def flat(self) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        return torch.cat([params[n].detach().flatten() for n in self.parameter_names()])

    def _unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        out, offset = {}, 0
        for name in self.parameter_names():
            n = params[name].numel()
            out[name] = theta[offset : offset + n].view_as(params[name])
            offset += n
        return out

    def load(self, theta: torch.Tensor) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self._unflatten(theta).items():
                params[name].copy_(value)

    # -- objectives ----------------------------------------------------------------------------------
    def losses(self, theta: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """[B] summed target-token losses at parameters theta (other weights as in the model)."""
        wrapper = _Functional(self.model, self._unflatten(theta))
        return LanguageModelingTask().document_loss(wrapper, batch)

    def pretrain_objective(self, theta: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        losses = self.losses(theta, self.documents)
        weights = torch.ones_like(losses) if weights is None else weights
        return (weights * losses).sum() / len(losses) + 0.5 * self.weight_decay * theta.square().sum()

    def finetune_objective(self, theta: torch.Tensor, theta_pt: torch.Tensor) -> torch.Tensor:
        return self.losses(theta, self.pairs).mean() + 0.5 * self.alpha * (theta - theta_pt).square().sum()

    def example_gradients(self, theta: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """[B, P] gradient of each sequence's summed loss (autograd, independent of pretrace's capture)."""
        theta = theta.detach()
        return torch.stack([torch.func.grad(lambda th: self.losses(th, batch)[i])(theta) for i in range(len(batch))])

    # -- solving -------------------------------------------------------------------------------------
    def solve_pretraining(self, start: torch.Tensor) -> torch.Tensor:
        return newton_minimise(self.pretrain_objective, start)

    def solve_finetuning(self, start: torch.Tensor, theta_pt: torch.Tensor) -> torch.Tensor:
        return newton_minimise(lambda th: self.finetune_objective(th, theta_pt), start)

    def removal_effects(self, theta_pt: torch.Tensor, theta_ft: torch.Tensor, indices: list[int], progress: bool = True) -> torch.Tensor:
        """[n_indices, Q]: change of each query's loss when document i is removed and both stages re-solved."""
        base = self.losses(theta_ft, self.queries).detach()
        pt_factor = torch.linalg.cholesky(hessian(self.pretrain_objective, theta_pt))
        ft_factor = torch.linalg.cholesky(hessian(lambda th: self.finetune_objective(th, theta_pt), theta_ft))
        effects = []
        for i in tqdm(indices, desc="retraining", unit="document", disable=not progress):
            weights = torch.ones(len(self.documents), dtype=theta_pt.dtype)
            weights[i] = 0.0
            new_pt = chord_minimise(lambda th: self.pretrain_objective(th, weights), theta_pt, pt_factor)
            new_ft = chord_minimise(lambda th: self.finetune_objective(th, new_pt), theta_ft + (new_pt - theta_pt), ft_factor)
            effects.append(self.losses(new_ft, self.queries).detach() - base)
        return torch.stack(effects)


class _Functional(torch.nn.Module):
    """Calls the model with some parameters replaced (differentiably) by given tensors."""

    def __init__(self, model: torch.nn.Module, parameters: dict[str, torch.Tensor]):
        super().__init__()
        self.inner, self.parameters_override = model, parameters

    def forward(self, *args, **kwargs):
        return functional_call(self.inner, self.parameters_override, args, kwargs, strict=False)


def hessian(objective, theta: torch.Tensor) -> torch.Tensor:
    """Dense exact Hessian [P, P] of a scalar objective (vectorised reverse-over-reverse autograd)."""
    matrix = torch.autograd.functional.hessian(objective, theta.detach(), vectorize=True)
    return 0.5 * (matrix + matrix.T)


def _value_and_gradient(objective, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Objective and gradient; an overflowing trial point (a too-long step) reads as +inf, never an error."""
    theta = theta.detach().requires_grad_(True)
    try:
        value = objective(theta)
    except PretraceError:
        return float("inf"), torch.full_like(theta, float("inf"))
    return float(value), torch.autograd.grad(value, theta)[0]


def newton_minimise(objective, start: torch.Tensor, tolerance: float = 1e-10, max_steps: int = 200) -> torch.Tensor:
    """Levenberg-damped Newton with the exact Hessian until ‖∇‖ < tolerance (quadratic near the optimum).

    Far from the optimum the Hessian of a network's loss can be indefinite: the damping μ grows until
    H + μI is positive definite and the step lowers the objective, and shrinks again after each success.
    """
    theta = _quasi_newton(objective, start)
    value, grad = _value_and_gradient(objective, theta)
    mu = 0.0
    for _ in range(max_steps):
        if grad.norm() < tolerance:
            return theta
        curvature = hessian(objective, theta)
        eye = torch.eye(len(theta), dtype=theta.dtype)
        while True:
            factor, info = torch.linalg.cholesky_ex(curvature + mu * eye)
            if info == 0:
                candidate = theta - torch.cholesky_solve(grad.unsqueeze(1), factor).squeeze(1)
                new_value, new_grad = _value_and_gradient(objective, candidate)
                if new_value <= value:
                    theta, value, grad = candidate, new_value, new_grad
                    mu = mu / 10 if mu > 1e-12 else 0.0
                    break
            mu = max(10 * mu, 1e-6)
            if mu > 1e12:
                raise PretraceError("Newton's method cannot lower the objective; the problem is badly scaled (raise the weight decay).")
    raise PretraceError(f"Newton's method did not reach gradient norm {tolerance:g} in {max_steps} steps (last {float(grad.norm()):.3g}).")


def _quasi_newton(objective, start: torch.Tensor, tolerance: float = 1e-5) -> torch.Tensor:
    """L-BFGS (cheap gradient steps) until Newton's quadratic convergence can take over."""
    theta = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=2000, tolerance_grad=tolerance, tolerance_change=1e-14,
                                  history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = objective(theta)
        value.backward()
        return value

    optimizer.step(closure)
    return theta.detach()


def chord_minimise(objective, start: torch.Tensor, factor: torch.Tensor, tolerance: float = 1e-10, max_steps: int = 100) -> torch.Tensor:
    """Newton steps with a fixed Cholesky factor of a nearby Hessian; full Newton if they stop contracting."""
    theta = start.detach().clone()
    _, grad = _value_and_gradient(objective, start)
    for _ in range(max_steps):
        if grad.norm() < tolerance:
            return theta
        candidate = theta - torch.cholesky_solve(grad.unsqueeze(1), factor).squeeze(1)
        _, new_grad = _value_and_gradient(objective, candidate)
        if not new_grad.norm() < 0.9 * grad.norm():  # also catches NaN
            break
        theta, grad = candidate, new_grad
    return newton_minimise(objective, theta, tolerance)
