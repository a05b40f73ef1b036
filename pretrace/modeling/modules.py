"""Which modules influence is computed over, and how each one's output splits into per-head blocks.

Every tracked module is a linear map y = W x (+ b); gradients are always handled in the `nn.Linear`
orientation `[d_out, d_in (+1 for the bias, last column)]`, also for Hugging Face's transposed `Conv1D`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from pretrace.errors import PretraceError

PRESETS = ("all", "mlp", "attention")
ATTENTION_BLOCKS = ("layer", "head")

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


def select_modules(
    model: nn.Module,
    preset: str = "all",
    regex: str | None = None,
    attention_blocks: str = "layer",
) -> list[TrackedModule]:
    """Linear modules inside the transformer blocks (never embeddings or the LM head), filtered by preset/regex."""
    if preset not in PRESETS:
        raise PretraceError(f"unknown module preset {preset!r}; choose one of {list(PRESETS)}.")
    if attention_blocks not in ATTENTION_BLOCKS:
        raise PretraceError(f"unknown --attention-blocks {attention_blocks!r}; choose 'layer' or 'head'.")
    pattern = None
    if regex:
        try:
            pattern = re.compile(regex)
        except re.error as exc:
            raise PretraceError(f"--modules regex {regex!r} is invalid: {exc}.") from None
    container_name, _ = find_blocks_container(model)
    prefix = container_name + "."
    tracked: list[TrackedModule] = []
    for name, module in model.named_modules():
        if not name.startswith(prefix) or not _is_linear(module):
            continue
        if preset != "all" and _kind(name) != preset:
            continue
        if pattern is not None and not pattern.search(name):
            continue
        transposed = not isinstance(module, nn.Linear)
        d_in, d_out = (module.weight.shape if transposed else module.weight.shape[::-1])
        blocks = ("all",)
        if attention_blocks == "head":
            blocks = head_block_names(model, name, int(d_out)) or blocks
        tracked.append(
            TrackedModule(name, module, int(d_in), int(d_out), module.bias is not None, transposed, blocks)
        )
    if not tracked:
        raise PretraceError(f"no linear modules matched preset={preset!r} regex={regex!r} under {container_name!r}; loosen the selection.")
    return tracked

