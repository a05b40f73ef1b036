"""Capture each tracked module's inputs and output gradients in one backward pass per batch.

A document's gradient for a linear module is the sum over its tokens of outer products of output
gradient and input, so per-example gradients (and everything built from them: covariances, Λ,
scores, per-token contributions) come from these two captured tensors with one batched contraction,
never from one backward pass per document.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from pretrace.modeling.modules import TrackedModule


@dataclass
class CapturedBatch:
    """Per module: inputs `[B, T, d_in(+1)]` (a ones column appended for a bias) and output gradients `[B, T, d_out]`."""

    activations: dict[str, torch.Tensor]
    output_gradients: dict[str, torch.Tensor]
    losses: torch.Tensor  # [B], detached

    def example_gradients(self, name: str) -> torch.Tensor:
        """[B, d_out, d_in(+1)]: gradient of each example's summed loss w.r.t. the module's weight (and bias)."""
        return torch.einsum("bto,bti->boi", self.output_gradients[name], self.activations[name])


@contextmanager
def _only_tracked_require_grad(model: nn.Module, tracked: list[TrackedModule]) -> Iterator[None]:
    """Build the graph only through tracked weights: no embedding or LM-head gradients are ever computed."""
    previous = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for t in tracked:
            t.module.weight.requires_grad_(True)
        yield
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)


def capture(
    model: nn.Module,
    tracked: list[TrackedModule],
    loss_fn: Callable[[], torch.Tensor],
) -> CapturedBatch:
    """Run `loss_fn()` (a forward pass returning per-example losses `[B]`) and capture inputs and output gradients."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(t: TrackedModule):
        def hook(_module, args, output):
            if t.name in outputs:
                raise RuntimeError(f"{t.name} was called twice in one forward pass; shared modules cannot be tracked.")
            x = args[0].detach()
            if t.has_bias:
                x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
            inputs[t.name] = x
            outputs[t.name] = output

        return hook

    for t in tracked:
        handles.append(t.module.register_forward_hook(make_hook(t)))
    try:
        with _only_tracked_require_grad(model, tracked), torch.enable_grad():
            losses = loss_fn()
            names = [t.name for t in tracked if t.name in outputs]
            grads = torch.autograd.grad(losses.sum(), [outputs[n] for n in names], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    common = losses.device  # with device_map="auto", modules on other devices hand back their tensors here
    output_gradients = {}
    for t in tracked:
        if t.name not in inputs:
            raise RuntimeError(f"{t.name} was not called in the forward pass.")
        grad = dict(zip(names, grads)).get(t.name)
        if grad is None:
            grad = torch.zeros(*inputs[t.name].shape[:-1], t.d_out, dtype=inputs[t.name].dtype, device=inputs[t.name].device)
        output_gradients[t.name] = grad.detach().to(common)
    return CapturedBatch({name: x.to(common) for name, x in inputs.items()}, output_gradients, losses.detach())
