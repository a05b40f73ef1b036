"""Loading a model stage and its data the same way for every command."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from pretrace import distributed
from pretrace.config import option, validate_choices
from pretrace.data.batching import TokenBatch, encode_documents, encode_queries, iter_batches
from pretrace.data.records import Document, count_records, iter_documents, iter_queries, read_queries
from pretrace.errors import PretraceError
from pretrace.modeling.loading import DTYPES, load_model, load_tokenizer, model_fingerprint, pad_token_id
from pretrace.modeling.modules import ATTENTION_BLOCKS, PRESETS, TrackedModule, select_modules


@dataclass
class ModelOptions:
    """How a model is loaded, which of its modules are tracked, and how text becomes batches."""

    preset: str = option("all", choices=PRESETS, help="What gradients are taken over: the linear modules inside the transformer blocks (all, mlp or attention), or all-parameters: every parameter (embeddings, norms, LM head, biases; a tied weight once), for the methods without Kronecker factors (identity, gradient-dot, gradient-cosine, cka, trak, exact, cg, lissa, arnoldi); per-example embedding gradients cost vocabulary x hidden numbers each.")
    modules: str | None = option(None, help="Regular expression on module names, applied after --preset (e.g. 'layers\\.(10|11)\\.').")
    attention_blocks: str = option("layer", choices=ATTENTION_BLOCKS, help="Output-gradient blocks of fused QKV projections: one per module ('layer') or one per head and q/k/v ('head').")
    dtype: str = option("float32", choices=tuple(DTYPES), help="Model precision.")
    device: str = option("auto", help="'cpu', 'cuda', 'cuda:1', ... or 'auto' (CUDA when available).")
    device_map: str | None = option(None, help="Spread a model too large for one device over all of them (Hugging Face device_map, e.g. 'auto'; needs accelerate); --device is then ignored. Not with torchrun.")
    max_length: int = option(512, help="Longer sequences are truncated (with a warning that counts them).")
    batch_size: int = option(8, help="Sequences per forward/backward pass.")
    padding_side: str = option("right", choices=("right", "left"), help="Padding side of batches (scores do not depend on it).")

    def __post_init__(self):
        validate_choices(self)
        if self.max_length < 2:
            raise PretraceError("--max-length must be at least 2.")
        if self.batch_size < 1:
            raise PretraceError("--batch-size must be at least 1.")
        if self.device_map is not None and distributed.requested_world_size() > 1:
            raise PretraceError("--device-map spreads one model over the devices of one process; under torchrun use one device per process instead.")

    def torch_device(self) -> torch.device:
        return distributed.resolve_device(self.device)


DocumentSource = str | Path | list[Document]


def iter_source(documents) -> Iterator[Document]:
    """Documents from a JSONL path (streamed) or an in-memory list."""
    return iter_documents(documents) if isinstance(documents, (str, Path)) else iter(documents)


@dataclass
class Stage:
    """A loaded model with its tokenizer and tracked modules."""

    path: Path
    model: torch.nn.Module
    tokenizer: object
    tracked: list[TrackedModule]
    options: ModelOptions

    @property
    def fingerprint(self) -> str:
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = model_fingerprint(self.model)  # the whole model: factors of any module subset match it
        return self._fingerprint

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def document_batches(self, documents: DocumentSource) -> Callable[[], Iterator[TokenBatch]]:
        """A re-iterable stream of document batches (every pass re-reads a file source)."""
        return lambda: iter_batches(
            encode_documents(self.tokenizer, iter_source(documents), self.options.max_length),
            self.options.batch_size, self.pad_id, self.options.padding_side,
        )

    def document_batch_count(self, documents: DocumentSource) -> int:
        count = count_records(documents) if isinstance(documents, (str, Path)) else len(documents)
        return -(-count // self.options.batch_size)

    def fitting_batches(self, path: str | Path) -> Callable[[], Iterator[TokenBatch]]:
        """Curvature data: plain documents (all tokens) or prompt/completion pairs (completion tokens only)."""
        if jsonl_format(path) == "documents":
            return self.document_batches(path)
        return lambda: self.query_batches(iter_queries(path))

    def query_batches(self, queries) -> Iterator[TokenBatch]:
        return iter_batches(encode_queries(self.tokenizer, queries, self.options.max_length), self.options.batch_size, self.pad_id, self.options.padding_side)


def jsonl_format(path: str | Path) -> str:
    """'pairs' if the first record has a 'prompt' (fine-tuning data), else 'documents'."""
    for _, record in zip(range(1), iter_queries(path)):
        return "pairs" if record.completion is not None else "documents"
    return "documents"


def load_stage(path: str | Path, options: ModelOptions, modules: list[str] | None = None) -> Stage:
    """Load model and tokenizer; track `modules` by name if given, else by the options' selection."""
    device = options.torch_device()
    model = load_model(path, options.dtype, device, options.device_map)
    tokenizer = load_tokenizer(path)
    tracked = select_modules(model, options.preset, options.modules, options.attention_blocks)
    if modules is not None:
        by_name = {t.name: t for t in tracked}
        tracked = [by_name[name] for name in modules if name in by_name]
    return Stage(Path(path), model, tokenizer, tracked, options)


def load_queries(path: str | Path):
    return read_queries(path)
