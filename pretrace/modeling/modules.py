"""Which parameters influence is computed over, and how each linear module's output splits into per-head blocks.

Scopes (--preset): the linear modules inside the transformer blocks ('all'), only their MLP or attention
modules, or every parameter of the model ('all-parameters': embeddings, norms, LM head, biases too).

A tracked linear module is y = W x (+ b); its gradients are always handled in the `nn.Linear`
orientation `[d_out, d_in (+1 for the bias, last column)]`, also for Hugging Face's transposed `Conv1D`.
Any other parameter is a `TrackedParameter` whose gradient is viewed as a `[d_out, d_in]` matrix (its
first dimension by the rest; a vector as one row), so every method handles both kinds as the same dict of
`[B, d_out, d_in']` blocks. Only linear modules have Kronecker structure (EK-FAC, K-FAC).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from pretrace.errors import PretraceError
from pretrace.settings.model import ALL_PARAMETERS, ATTENTION_BLOCKS, PRESETS


_ATTENTION_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "feed_forward", "ffn")


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it
        return ()
    return (Conv1D,)


@dataclass(frozen=True)
class TrackedModule:
    """A linear module and the layout of its output-gradient blocks."""

    name: str
    module: nn.Module = field(repr=False, compare=False)
    d_in: int
    d_out: int
    has_bias: bool
    transposed: bool  # Hugging Face Conv1D stores W as [d_in, d_out]
    block_names: tuple[str, ...] = ("all",)  # contiguous equal slices of the output, in order

    @property
    def n_blocks(self) -> int:
        return len(self.block_names)

    @property
    def block_size(self) -> int:
        return self.d_out // self.n_blocks

    @property
    def d_in_total(self) -> int:
        return self.d_in + int(self.has_bias)

    @property
    def num_parameters(self) -> int:
        return self.d_out * self.d_in_total

    def weight_gradient(self) -> torch.Tensor:
        """The module's current .grad in [d_out, d_in(+1)] orientation (for tests and exact baselines)."""
        weight = self.module.weight
        if weight.grad is None:
            raise RuntimeError(f"{self.name}: no gradient has been accumulated")
        grad = weight.grad.T if self.transposed else weight.grad
        if self.has_bias:
            grad = torch.cat([grad, self.module.bias.grad[:, None]], dim=1)
        return grad

    def parameters_matrix(self) -> torch.Tensor:
        weight = self.module.weight.T if self.transposed else self.module.weight
        if self.has_bias:
            weight = torch.cat([weight, self.module.bias[:, None]], dim=1)
        return weight

    def parameters(self) -> list[nn.Parameter]:
        """The model tensors behind the `[d_out, d_in']` block: weight, then bias."""
        return [self.module.weight, self.module.bias] if self.has_bias else [self.module.weight]

    def to_parameters(self, block: torch.Tensor) -> list[torch.Tensor]:
        """`[Q, d_out, d_in']` → `[Q, *p.shape]` for each p of `parameters()`."""
        weight = block[:, :, : self.d_in]
        out = [(weight.transpose(1, 2) if self.transposed else weight).contiguous()]
        if self.has_bias:
            out.append(block[:, :, self.d_in].contiguous())
        return out

    def from_parameters(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """`[Q, *p.shape]` for each p of `parameters()` → `[Q, d_out, d_in']`."""
        block = tensors[0].transpose(1, 2) if self.transposed else tensors[0]
        return torch.cat([block, tensors[1][:, :, None]], dim=2) if self.has_bias else block


@dataclass(frozen=True)
class TrackedParameter:
    """A parameter outside the tracked linear modules (embedding, norm, tied or untied LM head, loose bias),
    its gradient viewed as `[d_out, d_in]`: first dimension × the rest, or one row for a vector.

    It has no per-token factorisation, so its per-example gradients come from one backward pass per example
    (see `pretrace.gradients.capture`), and no Kronecker factors."""

    name: str
    parameter: nn.Parameter = field(repr=False, compare=False)
    d_out: int
    d_in: int
    has_bias: bool = False
    transposed: bool = False
    block_names: tuple[str, ...] = ("all",)

    @classmethod
    def of(cls, name: str, parameter: nn.Parameter) -> "TrackedParameter":
        d_out = parameter.shape[0] if parameter.dim() >= 2 else 1
        return cls(name, parameter, int(d_out), parameter.numel() // int(d_out))

    n_blocks = TrackedModule.n_blocks
    block_size = TrackedModule.block_size
    d_in_total = TrackedModule.d_in_total
    num_parameters = TrackedModule.num_parameters

    def weight_gradient(self) -> torch.Tensor:
        if self.parameter.grad is None:
            raise RuntimeError(f"{self.name}: no gradient has been accumulated")
        return self.parameter.grad.reshape(self.d_out, self.d_in)

    def parameters_matrix(self) -> torch.Tensor:
        return self.parameter.reshape(self.d_out, self.d_in)

    def parameters(self) -> list[nn.Parameter]:
        return [self.parameter]

    def to_parameters(self, block: torch.Tensor) -> list[torch.Tensor]:
        return [block.reshape(-1, *self.parameter.shape)]

    def from_parameters(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensors[0].reshape(-1, self.d_out, self.d_in)


Tracked = TrackedModule | TrackedParameter


def only_linear_modules(tracked: Sequence[Tracked]) -> bool:
    """Whether every entry has Kronecker and per-token structure (no all-parameters extras)."""
    return all(isinstance(t, TrackedModule) for t in tracked)


def require_linear_modules(tracked: Sequence[Tracked], purpose: str) -> None:
    """Refuse parameters without Kronecker structure where a method needs it."""
    others = [t.name for t in tracked if not isinstance(t, TrackedModule)]
    if others:
        listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise PretraceError(
            f"{purpose} needs Kronecker-factored linear modules, but the selection also tracks other parameters ({listed}); "
            f"use --preset all, mlp or attention, or a method that supports --preset {ALL_PARAMETERS} "
            "(identity, gradient-dot, gradient-cosine, cka, trak, exact, cg, lissa, arnoldi)."
        )


def find_blocks_container(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer's list of blocks: the ModuleList holding the most parameters."""
    best: tuple[str, nn.ModuleList] | None = None
    best_size = -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise PretraceError("could not find the transformer blocks (no nn.ModuleList in the model); select modules with --modules REGEX.")
    return best


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or isinstance(module, _conv1d_type())


def _kind(name: str) -> str | None:
    parts = name.lower().split(".")
    if any(word in part for part in parts for word in _ATTENTION_WORDS):
        return "attention"
    if any(word in part for part in parts for word in _MLP_WORDS):
        return "mlp"
    return None


def head_block_names(model: nn.Module, name: str, d_out: int) -> tuple[str, ...] | None:
    """Per-head block names of a module's output in the architecture's real memory layout, or None.

    GPT-NeoX and BLOOM fuse QKV as [head][q|k|v][head_dim]; GPT-2's `c_attn` as [q|k|v][head][head_dim];
    Llama-style models have separate q/k/v projections (k/v with the grouped-query head count).
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    model_type = getattr(config, "model_type", "")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    leaf = name.rsplit(".", 1)[-1]
    if heads is None:
        return None
    if leaf == "query_key_value" and model_type in ("gpt_neox", "bloom"):
        return tuple(f"head{h}.{p}" for h in range(heads) for p in "qkv")
    if leaf == "c_attn" and model_type == "gpt2":
        return tuple(f"head{h}.{p}" for p in "qkv" for h in range(heads))
    if leaf in ("q_proj", "k_proj", "v_proj"):
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        count = heads if leaf == "q_proj" else kv_heads
        if d_out % count == 0:
            return tuple(f"head{h}.{leaf[0]}" for h in range(count))
    return None


def _compile(regex: str | None) -> re.Pattern | None:
    if not regex:
        return None
    try:
        return re.compile(regex)
    except re.error as exc:
        raise PretraceError(f"--modules regex {regex!r} is invalid: {exc}.") from None


def _tracked_linear(model: nn.Module, name: str, module: nn.Module, attention_blocks: str) -> TrackedModule:
    transposed = not isinstance(module, nn.Linear)
    d_in, d_out = (module.weight.shape if transposed else module.weight.shape[::-1])
    blocks = ("all",)
    if attention_blocks == "head":
        blocks = head_block_names(model, name, int(d_out)) or blocks
    return TrackedModule(name, module, int(d_in), int(d_out), module.bias is not None, transposed, blocks)


def _all_parameters(model: nn.Module, pattern: re.Pattern | None, attention_blocks: str) -> list[Tracked]:
    """Every parameter once, in the model's order: linear modules whose tensors no other module shares keep
    their per-token route, the rest (embeddings, norms, a tied LM head under its first name) are parameters."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    owner: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        if _is_linear(module) and all(uses[id(p)] == 1 for p in module.parameters(recurse=False)):
            for p in module.parameters(recurse=False):
                owner[id(p)] = (name, module)
    tracked: list[Tracked] = []
    emitted: set[str] = set()
    for name, p in model.named_parameters():
        if id(p) in owner:
            module_name, module = owner[id(p)]
            if module_name not in emitted and (pattern is None or pattern.search(module_name)):
                tracked.append(_tracked_linear(model, module_name, module, attention_blocks))
            emitted.add(module_name)
        elif pattern is None or pattern.search(name):
            tracked.append(TrackedParameter.of(name, p))
    return tracked


def select_modules(
    model: nn.Module,
    preset: str = "all",
    regex: str | None = None,
    attention_blocks: str = "layer",
) -> list[Tracked]:
    """Linear modules inside the transformer blocks filtered by preset/regex, or with preset 'all-parameters'
    every parameter of the model (regex on module or parameter names)."""
    if preset not in PRESETS:
        raise PretraceError(f"unknown module preset {preset!r}; choose one of {list(PRESETS)}.")
    if attention_blocks not in ATTENTION_BLOCKS:
        raise PretraceError(f"unknown --attention-blocks {attention_blocks!r}; choose 'layer' or 'head'.")
    pattern = _compile(regex)
    if preset == ALL_PARAMETERS:
        tracked = _all_parameters(model, pattern, attention_blocks)
        if not tracked:
            raise PretraceError(f"no parameters matched regex={regex!r}; loosen the selection.")
        return tracked
    container_name, _ = find_blocks_container(model)
    prefix = container_name + "."
    tracked = []
    for name, module in model.named_modules():
        if not name.startswith(prefix) or not _is_linear(module):
            continue
        if preset != "all" and _kind(name) != preset:
            continue
        if pattern is not None and not pattern.search(name):
            continue
        tracked.append(_tracked_linear(model, name, module, attention_blocks))
    if not tracked:
        raise PretraceError(f"no linear modules matched preset={preset!r} regex={regex!r} under {container_name!r}; loosen the selection.")
    return tracked
