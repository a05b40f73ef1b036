"""Exact curvature-vector products over the tracked parameters, shared by the `exact`, `cg`, `lissa` and
`arnoldi` inverse-curvature baselines.

The curvature is the mean over the fitting documents of each document's summed-loss curvature (the
scale of EK-FAC's per-document Fisher), either

* the Gauss-Newton matrix C = mean_d Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t, with J_t the Jacobian of the
  logits at position t (for softmax cross-entropy this equals the true Fisher), or
* the Hessian of the loss, which adds second-order terms of the network and may be indefinite.

Products never build J: J v comes from the double-backward trick (the gradient of the linear map
u ↦ Jᵀu with respect to u), Jᵀ w from an ordinary backward pass, Hessian products from double backward.
Several vectors share one forward pass (`is_grads_batched`). Solvers see vectors as flat `[Q, P]` rows
(entries in tracked order, each `[d_out, d_in']` row-major: a module's bias column last, a parameter of the
all-parameters scope as its own tensor flattened), so the conversion between
the dict of module gradients and the model's weight and bias tensors lives here, once.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pretrace.curvature.operators import Gradients, Preconditioner, check_damping
from pretrace.data.batching import TokenBatch
from pretrace.errors import PretraceError
from pretrace.gradients.capture import compute_dtype
from pretrace.gradients.task import summed_cross_entropy, token_logits
from pretrace.modeling.modules import Tracked

CURVATURES = ("ggn", "hessian")
LOGIT_ELEMENTS_PER_PASS = 2**25  # vectors sharing a forward pass are limited by their [Q, B, T, V] logit tangents
TRACE_PROBES = 64  # Hutchinson probes for the relative damping: a few per cent of error, one batched pass


class ParameterLayout:
    """Maps between gradient dicts `{name: [Q, d_out, d_in']}`, flat `[Q, P]` rows and the model's own
    parameter tensors (each tracked entry's `parameters()`: weight then bias of a linear module, Conv1D
    weights transposed; or a whole parameter of the all-parameters scope, a tied one once)."""

    def __init__(self, tracked: Sequence[Tracked]):
        self.tracked = list(tracked)
        self.num_parameters = sum(t.num_parameters for t in self.tracked)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for t in self.tracked for p in t.parameters()]

    def flatten(self, grads: Gradients) -> torch.Tensor:
        missing = [t.name for t in self.tracked if t.name not in grads]
        if missing:
            raise PretraceError(f"gradients are missing tracked modules {missing}; score with the module selection the solver was fitted on.")
        return torch.cat([grads[t.name].flatten(1) for t in self.tracked], dim=1)

    def _modules(self, flat: torch.Tensor) -> Iterator[tuple[Tracked, torch.Tensor]]:
        offset = 0
        for t in self.tracked:
            yield t, flat[:, offset : offset + t.num_parameters].reshape(-1, t.d_out, t.d_in_total)
            offset += t.num_parameters

    def unflatten(self, flat: torch.Tensor) -> Gradients:
        return {t.name: block for t, block in self._modules(flat)}

    def to_parameters(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """`[Q, *p.shape]` for every parameter p of `parameters()`."""
        return [tensor for t, block in self._modules(flat) for tensor in t.to_parameters(block)]

    def from_parameters(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        rows, index = [], 0
        for t in self.tracked:
            count = len(t.parameters())
            rows.append(t.from_parameters(tensors[index : index + count]).flatten(1))
            index += count
        return torch.cat(rows, dim=1)


@contextmanager
def _differentiable(params: Sequence[torch.nn.Parameter], model: torch.nn.Module) -> Iterator[None]:
    """Graphs through the tracked parameters only; SDPA on its math kernel, the one with double backward."""
    previous = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)


class CurvatureProducts:
    """v ↦ C v for flat vectors `[Q, P]` over the tracked parameters, C averaged over the documents of the
    given batches (by default all fitting batches)."""

    def __init__(self, model: torch.nn.Module, tracked: Sequence[Tracked], batches: Sequence[TokenBatch], kind: str = "ggn"):
        if kind not in CURVATURES:
            raise PretraceError(f"unknown --curvature {kind!r}; choose one of {list(CURVATURES)}.")
        if not batches:
            raise PretraceError("no fitting documents for the curvature; pass a non-empty --fit-data (or --train) file.")
        self.model, self.kind = model, kind
        self.layout = ParameterLayout(tracked)
        self.device, self.dtype = next(model.parameters()).device, compute_dtype(model)
        self.batches = [batch.to(self.device) for batch in batches]
        self.num_documents = sum(len(batch) for batch in self.batches)
        self.document_products = 0  # (document, vector) curvature products so far: what the solvers cost

    @property
    def num_parameters(self) -> int:
        return self.layout.num_parameters

    def __call__(self, vectors: torch.Tensor, batches: Sequence[TokenBatch] | None = None) -> torch.Tensor:
        batches = self.batches if batches is None else batches
        vectors = vectors.to(self.device, self.dtype)
        params = self.layout.parameters()
        # converted between flat rows and parameter tensors once per call, not once per batch (the same sums in
        # the same order: a change of layout only)
        tangents = [t.to(p.dtype) for t, p in zip(self.layout.to_parameters(vectors), params)]
        totals = [torch.zeros(t.shape, dtype=self.dtype, device=self.device) for t in tangents]
        with _differentiable(params, self.model):
            for batch in batches:
                for total, result in zip(totals, self._batch_products(batch, params, tangents)):
                    total += result
        documents = sum(len(batch) for batch in batches)
        self.document_products += len(vectors) * documents
        return self.layout.from_parameters(totals) / documents

    def _batch_products(self, batch: TokenBatch, params: list, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        """Σ over the batch's documents of their curvature times every vector, per parameter `[Q, *p.shape]`."""
        logits = token_logits(self.model, batch)
        per_pass = max(1, LOGIT_ELEMENTS_PER_PASS // logits.numel())
        if self.kind == "ggn":
            dual = torch.zeros_like(logits, requires_grad=True)  # Jᵀu is linear in u, so ∂(Jᵀu · v)/∂u = J v
            transposed = torch.autograd.grad(logits, params, dual, create_graph=True)
            probs = torch.softmax(logits.detach().to(self.dtype), dim=-1) * batch.predict_mask[..., None]
        else:
            loss = summed_cross_entropy(logits, batch.next_tokens, batch.predict_mask).sum()
            gradient = torch.autograd.grad(loss, params, create_graph=True)
        out: list[list[torch.Tensor]] = [[] for _ in params]
        for start in range(0, len(tangents[0]), per_pass):
            chunk = [t[start : start + per_pass] for t in tangents]
            if self.kind == "ggn":
                jv = torch.autograd.grad(transposed, dual, chunk, retain_graph=True, is_grads_batched=True)[0].to(self.dtype)
                # (diag p − p pᵀ) J v = p ⊙ (J v − pᵀ J v), in place: the [Q, B, T, V] logit tangents are the largest tensors here
                jv.sub_((probs * jv).sum(-1, keepdim=True)).mul_(probs)
                result = torch.autograd.grad(logits, params, jv.to(logits.dtype), retain_graph=True, is_grads_batched=True)
            else:
                result = torch.autograd.grad(gradient, params, chunk, retain_graph=True, is_grads_batched=True)
            for pieces, r in zip(out, result):
                pieces.append(r.to(self.dtype))
        return [torch.cat(pieces) if len(pieces) > 1 else pieces[0] for pieces in out]

    def mean_eigenvalue(self, seed: int, probes: int = TRACE_PROBES) -> float:
        """trace(C) / P by Hutchinson's estimator with Rademacher probes: the scale relative damping refers to."""
        generator = torch.Generator().manual_seed(seed)
        z = torch.randint(0, 2, (probes, self.num_parameters), generator=generator).to(self.device, self.dtype) * 2 - 1
        return float((z * self(z)).sum(1).mean()) / self.num_parameters


def damping_value(damping: float | None, damping_factor: float, mean_eigenvalue: Callable[[], float]) -> float:
    """The absolute damping λ if given, else `damping_factor` × the curvature's mean eigenvalue (trace / P),
    the same scale EK-FAC's relative damping refers to (there per module, here over all tracked parameters)."""
    check_damping(damping, damping_factor)
    return float(damping) if damping is not None else damping_factor * mean_eigenvalue()


class FlatInverse(Preconditioner):
    """A preconditioner computed on flat `[Q, P]` rows over all tracked parameters (cross-module curvature
    included), so it plugs into `PreconditionedGradients` like the module-wise EK-FAC inverse."""

    def __init__(self, products: CurvatureProducts, damping: float):
        self.products, self.damping = products, float(damping)
        self.layout, self.device, self.dtype = products.layout, products.device, products.dtype

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        """`[Q, P]` → `[Q, P]`, on the solver's device and dtype."""
        raise NotImplementedError

    def apply(self, grads: Gradients) -> Gradients:
        flat = self.layout.flatten(grads)
        solved = self.solve(flat.to(self.device, self.dtype)).to(flat.device, flat.dtype)
        return self.layout.unflatten(solved)

    def describe(self) -> dict:
        return {"type": type(self).__name__, "curvature": self.products.kind, "damping": self.damping,
                "parameters": self.layout.num_parameters, "fitting_documents": self.products.num_documents,
                "document_products": self.products.document_products}
