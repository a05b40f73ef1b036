"""A loaded model stage — model, tokenizer, tracked modules and how records become batches — the same for every
method and command (the options are the shared --preset/--dtype/--max-length/... flags)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from pretrace.config import IN_MEMORY, changed
from pretrace.data.batching import TokenBatch, encode_documents, encode_queries, iter_batches, pad_token_id
from pretrace.data.records import DEFAULT_FIELDS, Document, Fields, RecordSource, iter_documents, iter_queries, scan_records
from pretrace.errors import PretraceError
from pretrace.modeling.folders import check_model_dir
from pretrace.modeling.loading import DTYPES, check_model_tokenizer, load_model, load_tokenizer, model_fingerprint
from pretrace.modeling.adapters import ADAPTER_MODULES, ADAPTER_PARAMETERS, is_adapter_folder
from pretrace.modeling.memory import MemoryPlan, one_pass, plan_run
from pretrace.modeling.modules import TrackedModule, select_modules
from pretrace.settings.model import ModelOptions


DocumentSource = RecordSource  # a path, a dataset name, or records in memory (a list of Documents: already read)


def _read_already(documents: DocumentSource) -> bool:
    return isinstance(documents, list) and all(isinstance(document, Document) for document in documents)


def iter_source(documents: DocumentSource, fields: Fields = DEFAULT_FIELDS) -> Iterator[Document]:
    """Documents from a source (streamed and checked record by record), or a list of `Document`s read before."""
    return iter(documents) if _read_already(documents) else iter_documents(documents, fields)


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

    def document_batches(self, documents: DocumentSource, short: str = "keep") -> Callable[[], Iterator[TokenBatch]]:
        """A re-iterable stream of document batches (every pass re-reads a file source). Documents under 2 tokens
        are kept with no target (score 0, positions aligned) or, with `short="skip"`, left out with a warning."""
        return lambda: iter_batches(
            encode_documents(self.tokenizer, iter_source(documents, self.options.fields()), self.options.max_length, short),
            self.options.batch_size, self.pad_id, self.options.padding_side,
        )

    def document_batch_count(self, documents: DocumentSource) -> int:
        """Batches a pass takes; for a file, from a validating pass over every record, so a bad line fails before any work."""
        count = len(documents) if _read_already(documents) else scan_records(documents, self.options.fields())[1]
        return -(-count // self.options.batch_size)

    def fitting_batches(self, path: DocumentSource) -> Callable[[], Iterator[TokenBatch]]:
        """Curvature data: plain documents (all tokens) or prompt/completion pairs (completion tokens only), the kind
        decided from every record. Every record is read (and pairs encoded) here, so a bad one fails before any work;
        documents under 2 tokens add nothing to the curvature and are skipped with one counted warning."""
        fields = self.options.fields()
        if scan_records(path, fields)[0] == "documents":
            return self.document_batches(path, short="skip")
        for _ in encode_queries(self.tokenizer, iter_queries(path, "fitting pair", fields), self.options.max_length):
            pass
        return lambda: self.query_batches(iter_queries(path, "fitting pair", fields))

    def query_batches(self, queries) -> Iterator[TokenBatch]:
        return iter_batches(encode_queries(self.tokenizer, queries, self.options.max_length), self.options.batch_size, self.pad_id, self.options.padding_side)


def tracked_stage(path: str | Path, model: torch.nn.Module, tokenizer, options: ModelOptions, modules: list[str] | None = None) -> Stage:
    """The stage of a loaded model: its tracked modules by the options' selection (or by name, `modules`), and the
    options holding the sequence length actually used (the default resolved against the model's positions) and a
    batch size (`auto` not resolved by a command's plan: the largest one forward+backward pass fits)."""
    options = dataclasses.replace(options, max_length=check_model_tokenizer(path, model, tokenizer, options.max_length))
    if options.batch_size == "auto":
        options, _ = plan_run(None, options, lambda shapes, batch, length: MemoryPlan("pass", one_pass(shapes, batch, length)), model=model)
    unmerged = options.adapter == ADAPTER_PARAMETERS and is_adapter_folder(path)
    regex = f"(?=.*{ADAPTER_MODULES})" + (options.modules or "") if unmerged else options.modules
    tracked = select_modules(model, options.preset, regex, options.attention_blocks)
    if modules is not None:
        by_name = {t.name: t for t in tracked}
        tracked = [by_name[name] for name in modules if name in by_name]
    return Stage(Path(path), model, tokenizer, tracked, options)


def check_loaded(model: torch.nn.Module, tokenizer) -> None:
    """Refuse what is no loaded causal language model, or one handed over without its tokenizer."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"model must be a model folder's path or a loaded Hugging Face causal language model, not {type(model).__name__}.")
    if tokenizer is None:
        raise TypeError("a loaded model needs its tokenizer: pass tokenizer=... (e.g. AutoTokenizer.from_pretrained(folder)).")


def stage_of(model: torch.nn.Module, tokenizer, options: ModelOptions) -> Stage:
    """The stage of a model the Python API was handed: put in eval mode (influence is defined for the deterministic
    model) and used where it is; the options' --device, --dtype and --device-map concern loading and must stay unset."""
    loading = [flag for flag in changed(options) if flag in ("--device", "--dtype", "--device-map", "--adapter")]
    if loading:
        raise PretraceError(f"{', '.join(loading)} {'concerns' if len(loading) == 1 else 'concern'} loading a model folder, and this model is already loaded; "
                            "move or cast it yourself (model.to(...)), or pass its folder instead.")
    check_loaded(model, tokenizer)
    parameter = next(model.parameters())
    dtype = str(parameter.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise PretraceError(f"the model's parameters are {dtype}; pretrace takes gradients of {', '.join(DTYPES)} models, so cast it (model.to(torch.float32)).")
    options = dataclasses.replace(options, device=str(parameter.device), dtype=dtype)
    return tracked_stage(IN_MEMORY, model.eval(), tokenizer, options)


def load_stage(path: str | Path, options: ModelOptions, modules: list[str] | None = None, base: str | Path | None = None) -> Stage:
    """Load model and tokenizer; track `modules` by name if given, else by the options' selection. The stage's
    options hold the sequence length actually used (the default resolved against the model's positions).
    `base`: the base model of an adapter folder whose recorded base is not a local folder (--pretrained)."""
    device = options.torch_device()
    if options.adapter == ADAPTER_PARAMETERS and not is_adapter_folder(check_model_dir(path)):
        raise PretraceError(f"--adapter adapter tracks a PEFT adapter's own matrices, but {path} is a full model, not an adapter folder; "
                            "drop --adapter (or pass the adapter folder).")
    tokenizer = load_tokenizer(path, base)
    model = load_model(path, options.dtype, device, options.device_map, base=base, adapter=options.adapter)
    return tracked_stage(path, model, tokenizer, options, modules)


def match_stages(pretrained: Stage, finetuned: Stage) -> None:
    """Keep the modules present, with the same shape and blocks, in both stages (multi-stage pairs them module by
    module); warn about the rest."""
    pt = {t.name: t for t in pretrained.tracked}
    ft = {t.name: t for t in finetuned.tracked}
    common = [n for n in ft if n in pt and (pt[n].d_out, pt[n].d_in_total, pt[n].block_names) == (ft[n].d_out, ft[n].d_in_total, ft[n].block_names)]
    left_out = sorted(set(pt) ^ set(ft) | {n for n in set(pt) & set(ft) if n not in common})
    if not common:
        raise PretraceError("the pre-trained and fine-tuned models share no tracked module of the same name and shape; are they the same architecture?")
    if left_out:
        warnings.warn(f"modules not present with the same shape in both models are left out: {', '.join(left_out)}", stacklevel=2)
    pretrained.tracked = [pt[n] for n in common]
    finetuned.tracked = [ft[n] for n in common]
