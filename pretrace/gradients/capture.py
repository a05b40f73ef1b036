"""Capture each tracked module's inputs and output gradients in one backward pass per batch.

A document's gradient for a linear module is the sum over its tokens of outer products of output
gradient and input, so per-example gradients (and everything built from them: covariances, Λ,
scores, per-token contributions) come from these two captured tensors with one batched contraction,
never from one backward pass per document.

Parameters outside linear modules (the all-parameters scope: embeddings, norms, a tied LM head) have no
such factorisation. Their per-example gradients come from B more backward passes of the same retained
graph, one per example's loss, which sum a tied weight's uses as autograd always does. Each pass runs
through the whole batch's graph, so the extra cost grows as B² (SmolLM2-135M on one CPU thread, 46 tokens:
capture 1.9 s → 3.7 s at batch size 1, 4.5 s → about 20 s at batch size 4), and the gradients take B copies of
the parameters: an embedding is vocabulary × hidden numbers per example (SmolLM2-135M: 28 M, 113 MB in
float32). A vectorised backward (`is_grads_batched`) was slower still (30 s at batch size 4).

Through the backward pass capture holds little beyond what autograd itself keeps: a module's input is the
tensor autograd saves for the weight gradient (the ones column of a bias is appended once the pass is over),
and its output is held by its graph edge, not its values. Tiny GPT-NeoX (2 layers, hidden 64, 16 × 64 tokens):
27.0 MB of tensors at the peak with both copies, 20.9 MB without, a plain forward+backward 21.5 MB.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from pretrace.modeling.modules import Tracked, TrackedModule, TrackedParameter


@dataclass
class CapturedBatch:
    """Per tracked entry, factors whose contraction over their second axis is the per-example gradient:
    for a linear module its inputs `[B, T, d_in(+1)]` (a ones column appended for a bias) and output
    gradients `[B, T, d_out]`, per token; for a `TrackedParameter` an identity and the gradient itself
    (views over its smaller side, not tokens: no per-token contributions), kept with the gradient in
    `parameter_gradients`. Scoring contracts the factors directly, so it handles both kinds alike."""

    activations: dict[str, torch.Tensor]
    output_gradients: dict[str, torch.Tensor]
    losses: torch.Tensor  # [B], detached
    parameter_gradients: dict[str, torch.Tensor] = field(default_factory=dict)  # [B, d_out, d_in] per TrackedParameter

    def example_gradients(self, name: str) -> torch.Tensor:
        """[B, d_out, d_in(+1)]: gradient of each example's summed loss w.r.t. the module's weight (and bias)."""
        if name in self.parameter_gradients:
            return self.parameter_gradients[name]
        return torch.einsum("bto,bti->boi", self.output_gradients[name], self.activations[name])


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype gradients, factors and scores are combined in: the model's, but at least float32."""
    return torch.promote_types(next(model.parameters()).dtype, torch.float32)


def rank_one_factors(gradients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output factors `[B, r, d_out]`, input factors `[B, r, d_in]`) with Σ_r o_r i_rᵀ = the gradient,
    r = min(d_out, d_in): the gradient's rows against an identity, or its columns. No memory is copied."""
    batch, d_out, d_in = gradients.shape
    if d_out <= d_in:
        eye = torch.eye(d_out, dtype=gradients.dtype, device=gradients.device)
        return eye.expand(batch, d_out, d_out), gradients
    eye = torch.eye(d_in, dtype=gradients.dtype, device=gradients.device)
    return gradients.transpose(1, 2), eye.expand(batch, d_in, d_in)


def _with_bias_column(inputs: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """Inputs with a ones column appended for the bias (a copy: made after the backward pass, not during it)."""
    return torch.cat([inputs, inputs.new_ones(*inputs.shape[:-1], 1)], dim=-1) if has_bias else inputs


@contextmanager
def _only_tracked_require_grad(model: nn.Module, tracked: Sequence[Tracked]) -> Iterator[None]:
    """Build the graph only through tracked tensors: no other parameter's gradient is ever computed."""
    previous = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for t in tracked:
            (t.module.weight if isinstance(t, TrackedModule) else t.parameter).requires_grad_(True)
        yield
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)


def per_example_parameter_gradients(losses: torch.Tensor, parameters: Sequence[TrackedParameter]) -> dict[str, torch.Tensor]:
    """`[B, d_out, d_in]` per parameter: ∂losses[b]/∂p, one backward pass of the retained graph per example."""
    out = {t.name: torch.zeros(len(losses), t.d_out, t.d_in, dtype=t.parameter.dtype, device=losses.device) for t in parameters}
    for b in range(len(losses) if parameters else 0):
        grads = torch.autograd.grad(losses[b], [t.parameter for t in parameters], retain_graph=b + 1 < len(losses), allow_unused=True)
        for t, grad in zip(parameters, grads):
            if grad is not None:  # None: not on the path to the loss (e.g. an unused position embedding)
                out[t.name][b] = grad.detach().reshape(t.d_out, t.d_in)
    return out


def capture(
    model: nn.Module,
    tracked: Sequence[Tracked],
    loss_fn: Callable[[], torch.Tensor],
) -> CapturedBatch:
    """Run `loss_fn()` (a forward pass returning per-example losses `[B]`) and capture inputs and output
    gradients of the linear modules, and per-example gradients of any other tracked parameters."""
    modules = [t for t in tracked if isinstance(t, TrackedModule)]
    parameters = [t for t in tracked if isinstance(t, TrackedParameter)]
    inputs: dict[str, torch.Tensor] = {}
    output_edges: dict[str, torch.autograd.graph.GradientEdge] = {}
    handles = []

    def make_hook(t: TrackedModule):
        def hook(_module, args, output):
            if t.name in output_edges:
                raise RuntimeError(f"{t.name} was called twice in one forward pass; shared modules cannot be tracked.")
            inputs[t.name] = args[0].detach()  # the storage autograd saves for the weight gradient: no copy
            output_edges[t.name] = get_gradient_edge(output)  # the output's values can be freed as soon as the graph allows

        return hook

    for t in modules:
        handles.append(t.module.register_forward_hook(make_hook(t)))
    try:
        with _only_tracked_require_grad(model, tracked), torch.enable_grad():
            losses = loss_fn()
            names = [t.name for t in modules if t.name in output_edges]
            grads = torch.autograd.grad(losses.sum(), [output_edges[n] for n in names], allow_unused=True, retain_graph=bool(parameters)) if names else ()
            parameter_gradients = per_example_parameter_gradients(losses, parameters)
    finally:
        for handle in handles:
            handle.remove()
    common = losses.device  # with device_map="auto", modules on other devices hand back their tensors here
    output_gradients = {}
    for t in modules:
        if t.name not in inputs:
            raise RuntimeError(f"{t.name} was not called in the forward pass.")
        grad = dict(zip(names, grads)).get(t.name)
        if grad is None:
            grad = torch.zeros(*inputs[t.name].shape[:-1], t.d_out, dtype=inputs[t.name].dtype, device=inputs[t.name].device)
        output_gradients[t.name] = grad.detach().to(common)
    activations = {t.name: _with_bias_column(inputs.pop(t.name).to(common), t.has_bias) for t in modules}
    for name, gradients in parameter_gradients.items():
        output_gradients[name], activations[name] = rank_one_factors(gradients)
    return CapturedBatch(activations, output_gradients, losses.detach(), parameter_gradients)
