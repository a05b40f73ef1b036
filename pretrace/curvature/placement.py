"""A module-wise preconditioner applied where its factors are kept, not where the gradients are.

`--factors-device cpu` applies the factors on the CPU while the model runs on a GPU; `--shard-factors`
applies each module's factors only on the rank that owns it, which broadcasts the result, so a rank only
ever moves its own modules' factors to its device. Either way the operator keeps its inner operator's
capabilities (an EK-FAC inverse stays diagonal in its Kronecker eigenbasis), so placing factors never
changes the route scores take, only where the arithmetic runs. On the eigenbasis route the query weights
carry each module's eigenbases (Q_A, Q_G, not Λ) to the model's device while documents are scored, unless
rotating the queries back is cheaper (`EigenbasisWeights.settle`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from pretrace.curvature.operators import Gradients, Preconditioner
from pretrace.errors import PretraceError
from pretrace.parallel.collectives import broadcast, owner
from pretrace.parallel.group import rank


class PlacedPreconditioner(Preconditioner):
    """`inner` (EK-FAC, K-FAC, diagonal, identity and their chains) applied on `device` (None: the
    gradients' own) and, with `by_module`, each of `modules` only on its owner: the position-th of the
    sorted names belongs to rank position % world. Collective when `by_module`: every rank must apply it
    to the same modules, in the same order, with the same shapes."""

    module_wise = True  # it only wraps module-wise operators

    def __init__(self, inner: Preconditioner, modules: Sequence[str], device: torch.device | str | None = None, by_module: bool = False):
        if not inner.module_wise:
            raise PretraceError(
                f"{type(inner).__name__} couples modules, so its factors cannot be placed or sharded by module; "
                "--factors-device cpu and --shard-factors work with ekfac, kfac, diagonal and identity (single- or multi-stage)."
            )
        self.inner, self.device, self.by_module = inner, None if device is None else torch.device(device), by_module
        self._owners = {name: owner(position) for position, name in enumerate(sorted(modules))}

    @property
    def kronecker_eigenbasis(self) -> bool:
        return self.inner.kronecker_eigenbasis

    @property
    def is_identity(self) -> bool:
        return self.inner.is_identity  # no factors to place: the same exact token-factor route as unplaced

    def _source(self, name: str) -> int:
        """The rank that applies `name`'s factors: its owner when sharded, else every rank itself."""
        if not self.by_module:
            return rank()
        if name not in self._owners:
            raise PretraceError(f"module {name!r} was not among the modules the factors were sharded over; place them with every tracked module.")
        return self._owners[name]

    def _placed(self, name: str, like: torch.Tensor, compute) -> torch.Tensor:
        """`compute(device)` on the module's source rank, at the factors' device, returned on `like`'s device on every rank."""
        source = self._source(name)
        out = compute(self.device or like.device).to(like.device) if source == rank() else torch.empty_like(like)
        return broadcast([out], source)[0] if self.by_module else out

    def apply(self, grads: Gradients) -> Gradients:
        out = {name: self._placed(name, grads[name], lambda device: self.inner.apply({name: grads[name].to(device)})[name])
               for name in sorted(grads)}  # one order on every rank: the broadcasts pair up
        return {name: out[name] for name in grads}

    def eigenbasis(self, name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's own copy, taken from the factors it holds (no collective): scoring documents in the
        eigenbasis needs the bases wherever documents are scored."""
        return tuple(q.to(device) for q in self.inner.eigenbasis(name, self.device or device, dtype))

    def apply_factored_in_eigenbasis(self, name: str, output_gradients: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        like = activations.new_empty(activations.shape[0], output_gradients.shape[-1], activations.shape[-1])
        return self._placed(name, like, lambda device: self.inner.apply_factored_in_eigenbasis(name, output_gradients.to(device), activations.to(device)))

    def apply_in_eigenbasis(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return self._placed(name, grad, lambda device: self.inner.apply_in_eigenbasis(name, grad.to(device)))

    def describe(self) -> dict:
        return {**self.inner.describe(), "factors_device": None if self.device is None else str(self.device), "factors_sharded_by_module": self.by_module}


def place_factors(preconditioner: Preconditioner, modules: Sequence[str], factors_device: str, shard_factors: bool) -> Preconditioner:
    """The fitted preconditioner with its factors kept on the CPU (`factors_device` "cpu") or one rank each
    (`shard_factors`), or as it is (`factors_device` "model": on the model's device, on every rank)."""
    if factors_device == "model" and not shard_factors:
        return preconditioner
    return PlacedPreconditioner(preconditioner, list(modules), None if factors_device == "model" else factors_device, shard_factors)
