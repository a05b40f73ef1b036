"""How a model is loaded and batched (`ModelOptions`) and the names its flags choose from.

Torch-free, so `pretrace COMMAND --help` builds these flags without loading torch; `pretrace.modeling` (stage,
modules, loading, adapters) re-exports them and maps the names to torch objects."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pretrace.config import option, validate
from pretrace.errors import PretraceError
from pretrace.settings.records import FieldOptions

if TYPE_CHECKING:
    import torch

ALL_PARAMETERS = "all-parameters"
PRESETS = ("all", "mlp", "attention", ALL_PARAMETERS)
ATTENTION_BLOCKS = ("layer", "head")
DTYPE_NAMES = ("float32", "float64", "bfloat16", "float16")  # the torch dtypes of `pretrace.modeling.loading.DTYPES`
DEFAULT_MAX_LENGTH = 512
MERGED, ADAPTER_PARAMETERS = "merged", "adapter"
ADAPTER_MODES = (MERGED, ADAPTER_PARAMETERS)


def cache_root() -> Path:
    """Where converted models live: $PRETRACE_CACHE, else ~/.cache/pretrace."""
    return Path(os.environ.get("PRETRACE_CACHE") or Path.home() / ".cache" / "pretrace")


@dataclass
class ModelOptions(FieldOptions):
    """How a model is loaded, which of its modules are tracked, and how records become batches."""

    preset: str = option("all", choices=PRESETS, help="What gradients are taken over: the linear modules inside the transformer blocks (all, mlp or attention), or all-parameters: every parameter (embeddings, norms, LM head, biases; a tied weight once), for the methods without Kronecker factors (identity, gradient-dot, gradient-cosine, cka, trak, exact, cg, lissa, arnoldi); per-example embedding gradients cost vocabulary x hidden numbers each.")
    modules: str | None = option(None, help="Regular expression on module names, applied after --preset (e.g. 'layers\\.(10|11)\\.').")
    attention_blocks: str = option("layer", choices=ATTENTION_BLOCKS, help="Output-gradient blocks of fused QKV projections: one per module ('layer') or one per head and q/k/v ('head').")
    dtype: str = option("float32", choices=DTYPE_NAMES, help="Model precision.")
    device: str = option("auto", help="'cpu', 'cuda', 'cuda:1', ... or 'auto' (CUDA when available).")
    device_map: str | None = option(None, help="Spread a model too large for one device over all of them (Hugging Face device_map, e.g. 'auto'; needs accelerate); --device is then ignored. Not with torchrun.")
    max_length: int | None = option(None, at_least=2, help=f"Longer sequences are truncated (with a warning that counts them); at most the model's positions. Default: the model's positions, at most {DEFAULT_MAX_LENGTH}.")
    batch_size: int | str = option(8, at_least=1, help="Sequences per forward/backward pass, or 'auto': the largest that the memory plan fits in the budget (--memory-gb).")
    memory_gb: float | None = option(None, above=0, help="Memory budget of the plan made before any model work (default: the memory available on the machine, or free on the GPU): a run predicted over it is refused, naming what would fit.")
    padding_side: str = option("right", choices=("right", "left"), help="Padding side of batches (scores do not depend on it).")
    adapter: str = option(MERGED, choices=ADAPTER_MODES, help="A PEFT adapter folder given as a model: 'merged' into its base (influence over the full weights, as the merged model; what multi-stage needs) or 'adapter' (track only the adapter's own matrices, e.g. LoRA A and B).")

    def __post_init__(self):
        from pretrace.parallel import group  # torch: only once settings are made, never for --help

        validate(self)
        if isinstance(self.batch_size, str) and self.batch_size != "auto":
            raise PretraceError(f"--batch-size {self.batch_size!r}: pass a number of sequences, or 'auto'.")
        if self.device_map is not None and not self.device_map.strip():
            raise PretraceError("--device-map '' names no placement; pass e.g. auto, balanced or sequential, or drop it.")
        if self.device_map is not None and self.device != "auto":
            raise PretraceError(f"--device {self.device} has no effect with --device-map (the map places the layers); drop one.")
        if self.device_map is not None and group.requested_world_size() > 1:
            raise PretraceError("--device-map spreads one model over the devices of one process; under torchrun use one device per process instead.")
        group.check_device(self.device)

    def torch_device(self) -> torch.device:
        from pretrace.parallel import group

        return group.resolve_device(self.device)
