"""Ground truth for multi-stage influence by actually retraining both stages.

A small problem whose two stages can be solved to numerical convergence: only the tracked linear
modules are trained (everything else frozen), pre-training minimises the mean document loss plus
w/2‖θ‖² (so H_pt is well defined and EK-FAC's damping for it is exactly w), and fine-tuning minimises
the mean completion loss plus α/2‖θ − θ_pt‖². Both are solved with full-batch L-BFGS in float64, warm
started, so removing one pre-training document and re-solving both stages measures the true change
of a query's loss that the influence formula predicts to first order: Δm ≈ score / N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from pretrace.data.batching import TokenBatch, collate, encode_documents, encode_queries
from pretrace.data.records import Document, Query
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
        task = LanguageModelingTask()
        wrapper = _Functional(self.model, self._unflatten(theta))
        return task.document_loss(wrapper, batch)

    def pretrain_objective(self, theta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return (weights * self.losses(theta, self.documents)).sum() / len(weights) + 0.5 * self.weight_decay * theta.square().sum()

    def finetune_objective(self, theta: torch.Tensor, theta_pt: torch.Tensor) -> torch.Tensor:
        return self.losses(theta, self.pairs).mean() + 0.5 * self.alpha * (theta - theta_pt).square().sum()

    # -- solving -------------------------------------------------------------------------------------
    def solve_pretraining(self, start: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        weights = torch.ones(len(self.documents), dtype=start.dtype) if weights is None else weights
        return minimise(lambda th: self.pretrain_objective(th, weights), start)

    def solve_finetuning(self, start: torch.Tensor, theta_pt: torch.Tensor) -> torch.Tensor:
        return minimise(lambda th: self.finetune_objective(th, theta_pt), start)

    def removal_effects(self, theta_pt: torch.Tensor, theta_ft: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """[n_indices, Q]: change of each query's loss when document i is removed and both stages re-solved."""
        base = self.losses(theta_ft, self.queries).detach()
        effects = []
        for i in indices:
            weights = torch.ones(len(self.documents), dtype=theta_pt.dtype)
            weights[i] = 0.0
            new_pt = self.solve_pretraining(theta_pt, weights)
            new_ft = self.solve_finetuning(theta_ft + (new_pt - theta_pt), new_pt)
            effects.append(self.losses(new_ft, self.queries).detach() - base)
        return torch.stack(effects)

    # -- exact curvature -----------------------------------------------------------------------------
    def hessian(self, objective, theta: torch.Tensor) -> torch.Tensor:
        return torch.autograd.functional.hessian(objective, theta.detach())


class _Functional(torch.nn.Module):
    """Calls the model with some parameters replaced (differentiably) by given tensors."""

    def __init__(self, model: torch.nn.Module, parameters: dict[str, torch.Tensor]):
        super().__init__()
        self.inner, self.parameters_override = model, parameters

    def forward(self, *args, **kwargs):
        return functional_call(self.inner, self.parameters_override, args, kwargs, strict=False)


def minimise(objective, start: torch.Tensor, tolerance: float = 1e-10, max_rounds: int = 50) -> torch.Tensor:
    """Full-batch L-BFGS with strong Wolfe line search until the gradient norm is below `tolerance`."""
    theta = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=200, tolerance_grad=tolerance, tolerance_change=1e-16,
                                  history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = objective(theta)
        value.backward()
        return value

    for _ in range(max_rounds):
        optimizer.step(closure)
        grad = torch.autograd.grad(objective(theta), theta)[0]
        if grad.norm() < tolerance * 10:
            break
    return theta.detach()
