"""Full-parameter fine-tuning with a proximity term, the objective multi-stage influence assumes.

The fine-tuned weights minimise (stochastically, one batch at a time)

    J(θ) = (1/N) Σ_i ℓ_i(θ) + α/2 ‖θ − θ_pt‖²

where ℓ_i is the *summed* cross-entropy of example i's completion tokens (of all its tokens when the
record is a bare 'text'), N the number of examples, and θ_pt the starting (pre-trained) weights of
every trainable parameter. This is the normalisation of `pretrace fit`'s curvature (the mean over
sequences of the Hessian of each sequence's summed loss), so the recorded α enters the influence
formula α (H_ft + αI)⁻¹ unchanged. Dropout is off by default: the derivation needs J's stationary point.

Under `torchrun --nproc-per-node N -m pretrace finetune ...` every rank takes its share of each batch and
the gradients are all-reduced (see `training.loop`); rank 0 alone writes the model folder.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from pretrace.parallel import group
from pretrace.config import IN_MEMORY, changed, require_instance, to_dict
from pretrace.data.batching import encode_queries, pad_token_id
from pretrace.errors import PretraceError
from pretrace.data.records import Query, RecordSource, in_memory, read_queries, source_sha256
from pretrace.modeling.adapters import model_folders
from pretrace.modeling.loading import check_model_tokenizer, load_model, load_tokenizer, model_fingerprint
from pretrace.storage import output_folder, read_json_object
from pretrace.training.loop import TrainHistory, TrainSettings, train
from pretrace.training.output import save_model_folder
from pretrace.settings.training import FinetuneSettings

FINETUNE_RECORD = "pretrace_finetune.json"
LOSS_NORMALISATION = "sequence"
OBJECTIVE = "(1/N) sum_i sum_{t in completion_i} -log p(x_t | x_<t) + alpha/2 * ||theta - theta_pt||^2 over all trainable parameters"


class ProximityPenalty:
    """α/2 ‖θ − θ_pt‖² over the trainable parameters, θ_pt copied at construction on the model's device."""

    def __init__(self, model: torch.nn.Module, alpha: float):
        self.alpha = alpha
        self.anchor = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        # `.to` is free on the anchor's own device and follows a model moved after construction (a Trainer's)
        squared = [(p - self.anchor[name].to(p.device)).square().sum() for name, p in model.named_parameters() if name in self.anchor]
        return 0.5 * self.alpha * torch.stack(squared).sum()


def finetune_model(model: torch.nn.Module, tokenizer, queries: Sequence[Query], settings: TrainSettings, alpha: float,
                   dropout: bool = False, progress: bool = True) -> TrainHistory:
    """Fine-tune `model` in place (on its device) from its current weights, which are θ_pt."""
    items = list(encode_queries(tokenizer, queries, settings.max_length))
    regulariser = ProximityPenalty(model, alpha) if alpha > 0 else None
    return train(model, items, settings, pad_token_id(tokenizer), normalisation=LOSS_NORMALISATION,
                 regulariser=regulariser, dropout=dropout, progress=progress)


def finetune(settings: FinetuneSettings, progress: bool = True, given: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Load `settings.model`, fine-tune it on `settings.data`, save model + tokenizer + record to `settings.out`
    (when set). `given`: what the Python API was handed instead of paths (their settings record IN_MEMORY):
    "model", a (model, tokenizer) pair, fine-tuned as a copy (the model handed over stays θ_pt), and "data"."""
    require_instance("settings", settings, FinetuneSettings)
    given = given or {}
    if settings.out is None and settings.overwrite:
        raise PretraceError("--overwrite has no effect without an output folder (out=None: nothing is written); drop it.")
    group.initialize()
    inputs = {flag: path for flag, path in {**model_folders("--model", settings.model), "--data": settings.data}.items() if path != IN_MEMORY}
    folder = nullcontext() if settings.out is None else output_folder(settings.out, settings.overwrite, inputs, command="finetune", lock=group.is_main())
    with folder:
        return _finetune(settings, progress, given)


def _starting_model(settings: FinetuneSettings, given: Mapping[str, Any]) -> tuple[torch.nn.Module, Any]:
    """θ_pt and its tokenizer: a copy of the model handed over (used where it is), or loaded from --model."""
    if "model" not in given:
        return load_model(settings.model, settings.dtype, settings.torch_device()), load_tokenizer(settings.model)
    loading = [flag for flag in changed(settings) if flag in ("--dtype", "--device")]
    if loading:
        raise PretraceError(f"{', '.join(loading)} {'concerns' if len(loading) == 1 else 'concern'} loading --model, and this model is already loaded; move or cast it yourself, or pass its folder.")
    model, tokenizer = given["model"]
    return copy.deepcopy(model), tokenizer


def _finetune(settings: FinetuneSettings, progress: bool, given: Mapping[str, Any]) -> torch.nn.Module:
    queries = read_queries(given.get("data", settings.data), "fine-tuning example", settings.fields())
    model, tokenizer = _starting_model(settings, given)
    if settings.dropout and not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        raise PretraceError(f"--dropout has no effect: {settings.model} has no dropout layer with a rate above 0; drop it.")
    settings = dataclasses.replace(settings, max_length=check_model_tokenizer(settings.model, model, tokenizer, settings.max_length))
    pretrained_fingerprint = model_fingerprint(model)
    history = finetune_model(model, tokenizer, queries, settings, settings.alpha, settings.dropout, progress)
    record = finetune_record(settings.alpha, settings.model, pretrained_fingerprint, given.get("data", settings.data), len(queries),
                             history.losses, to_dict(settings))
    model.pretrace_finetune = record  # what a fine-tuned folder records, for a model kept in memory too
    if settings.out is not None and group.is_main():
        save_model_folder(settings.out, model, tokenizer, FINETUNE_RECORD, record, "finetune", settings.overwrite)
    group.barrier()  # the folder is complete before any rank returns
    return model


def finetune_record(alpha: float, pretrained: str | Path, pretrained_fingerprint: str, data: RecordSource, examples: int,
                    step_losses: Sequence[float], settings: dict) -> dict:
    """What a fine-tuned folder records for `pretrace score`: α, the objective and what it was fine-tuned from and on
    (`pretrace finetune` and the Trainer callback write the same). `step_losses`: per step, without the proximity term."""
    last = list(step_losses)[-50:]
    return {
        "alpha": alpha,
        "loss_normalisation": LOSS_NORMALISATION,
        "objective": OBJECTIVE,
        "pretrained_path": _resolved(pretrained),
        "pretrained_fingerprint": pretrained_fingerprint,
        "data": IN_MEMORY if in_memory(data) else _resolved(data),
        "data_sha256": source_sha256(data),
        "examples": examples,
        "steps": len(step_losses),
        "final_train_loss": sum(last) / len(last) if last else None,  # mean of the last ≤ 50 steps
        "settings": settings,
    }


def _resolved(path: str | Path) -> str:
    return IN_MEMORY if path == IN_MEMORY else str(Path(path).resolve())


def read_finetune_record(folder: str | Path) -> dict | None:
    """The record `finetune` wrote in `folder`, or None for a model fine-tuned elsewhere."""
    path = Path(folder) / FINETUNE_RECORD
    return read_json_object(path, f"fine-tune {folder} again with `pretrace finetune`") if path.is_file() else None
