"""Proximal fine-tuning inside the user's own training loop: a Hugging Face `Trainer` (or TRL) callback and a
plain-PyTorch equivalent.

Both add the proximity term α/2‖θ − θ_pt‖² that multi-stage influence assumes, and at the end write what
`pretrace finetune` writes — the model folder with its `pretrace_finetune.json` record — and, optionally, the
fine-tuned EK-FAC factors, so `pretrace score --pretrained … --finetuned …` runs straight after
`trainer.train()`.

The objective is `pretrace finetune`'s: the mean over examples of each example's *summed* completion loss,
plus the proximity term; α is on that scale, which is what the influence formula α(H_ft + αI)⁻¹ needs.
The Trainer's default loss is a mean over tokens, so the callback brings its own `loss` to pass as
`Trainer(compute_loss_func=callback.loss)`, and refuses to go on without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from pretrace.config import require_number
from pretrace.data.batching import encode_queries
from pretrace.data.records import DEFAULT_FIELDS, Fields, read_queries
from pretrace.errors import PretraceError
from pretrace.modeling.loading import model_fingerprint
from pretrace.modeling.stage import ModelOptions
from pretrace.parallel import group
from pretrace.parallel.collectives import all_gather_objects
from pretrace.training.finetune import FINETUNE_RECORD, ProximityPenalty, finetune_record
from pretrace.training.output import save_model_folder
from pretrace.workflows.fit import fit

IGNORE_INDEX = -100  # Hugging Face's label for "no loss here"


class ProximalFinetuning:
    """θ_pt and α for a hand-written loop: add `penalty(model)` to each batch's mean-over-examples loss
    before `backward()`, then call `save(...)`.

    Construct it before the first optimizer step: the weights at construction are θ_pt."""

    def __init__(self, model: torch.nn.Module, alpha: float, pretrained: str | Path):
        require_number("alpha", alpha, at_least=0)  # 0: no proximity term
        self.alpha, self.pretrained = float(alpha), Path(pretrained)
        self._penalty = ProximityPenalty(model, self.alpha)
        self.pretrained_fingerprint = model_fingerprint(model)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        return self._penalty(model)

    def save(self, model: torch.nn.Module, tokenizer, out: str | Path, data: str | Path, *, step_losses: Sequence[float],
             settings: dict | None = None, factors: str | Path | None = None, options: ModelOptions | None = None,
             fields: Fields = DEFAULT_FIELDS, overwrite: bool = False) -> Path:
        """Write the fine-tuned model folder with the record `pretrace finetune` writes (`step_losses`: each step's
        data loss, without the proximity term); with `factors`, also fit the fine-tuned EK-FAC factors there on
        `data` (the fine-tuning examples, completion tokens only), as `pretrace fit` would."""
        examples = read_queries(data, "fine-tuning example", fields)
        record = finetune_record(self.alpha, self.pretrained, self.pretrained_fingerprint, data, len(examples), step_losses, settings or {})
        folder = save_model_folder(out, model, tokenizer, FINETUNE_RECORD, record, "finetune", overwrite)
        if factors is not None:
            fit(folder, data, factors, options, overwrite=overwrite, progress=False)
        return folder


def trainer_examples(tokenizer, data: str | Path, max_length: int = 512, fields: Fields = DEFAULT_FIELDS) -> list[dict[str, list[int]]]:
    """The fine-tuning examples tokenized exactly as `pretrace finetune` does, as Trainer rows: `labels`
    hold the completion tokens and IGNORE_INDEX elsewhere."""
    rows = []
    for item in encode_queries(tokenizer, read_queries(data, "fine-tuning example", fields), max_length):
        labels = [t if target else IGNORE_INDEX for t, target in zip(item.input_ids, item.target_mask)]
        rows.append({"input_ids": list(item.input_ids), "attention_mask": [1] * len(item.input_ids), "labels": labels})
    return rows


def pad_examples(pad_id: int):
    """A Trainer `data_collator` that right-pads `trainer_examples` rows (labels with IGNORE_INDEX)."""

    def collate(rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        pad = lambda key, value: torch.tensor([r[key] + [value] * (length - len(r[key])) for r in rows])  # noqa: E731
        return {"input_ids": pad("input_ids", pad_id), "attention_mask": pad("attention_mask", 0), "labels": pad("labels", IGNORE_INDEX)}

    return collate


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class PretraceCallback(_callback_base()):
    """A `transformers.TrainerCallback` that makes `trainer.train()` a proximal fine-tune pretrace can score.

        callback = PretraceCallback(model, alpha=0.01, pretrained="pretrained/", data="qa.jsonl",
                                    out="finetuned/", factors="factors_ft/")
        trainer = Trainer(model, args, train_dataset=..., compute_loss_func=callback.loss, callbacks=[callback])
        trainer.train()

    `loss` is each micro-batch's share of pretrace's objective: its summed completion losses over the examples of
    the accumulated batch, plus its share of α/2‖θ − θ_pt‖². Being part of the loss, the proximity term goes
    through the Trainer's loss scaling, gradient accumulation, all-reduce and clipping exactly as the data term
    does. The accumulated batch is counted as `gradient_accumulation_steps` micro-batches: exact when the data
    divides into them. Keep dropout off (the derivation needs the deterministic objective's stationary point)
    and weight decay 0.
    """

    def __init__(self, model: torch.nn.Module, alpha: float, pretrained: str | Path, data: str | Path, out: str | Path,
                 factors: str | Path | None = None, options: ModelOptions | None = None, fields: Fields = DEFAULT_FIELDS,
                 overwrite: bool = False):
        self.proximal = ProximalFinetuning(model, alpha, pretrained)
        self.data, self.out, self.factors, self.options, self.fields, self.overwrite = data, out, factors, options, fields, overwrite
        self._model: torch.nn.Module | None = None
        self._accumulation, self._rescaled, self._calls = 1, 1, 0
        self._step_loss, self._step_losses = 0.0, []

    def loss(self, outputs, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        """The `Trainer(compute_loss_func=...)` for pretrace's objective (see the class docstring)."""
        if self._model is None:
            raise PretraceError("PretraceCallback.loss was called before training began: pass the callback in Trainer(callbacks=[...]) too.")
        self._calls += 1
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        targets = labels[:, 1:].to(logits.device)
        summed = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        data = summed / (labels.shape[0] * self._accumulation)
        self._step_loss += float(data.detach())
        total = data + self.proximal.penalty(self._model) / self._accumulation if self.proximal.alpha > 0 else data
        # the Trainer multiplies a compute_loss_func's loss by the number of processes when it averages tokens across
        # devices (it assumes a global token normalisation); this loss is each process's own mean, so undo that
        return total / (self._rescaled if num_items_in_batch is not None else 1)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.weight_decay != 0:
            raise PretraceError(f"weight_decay={args.weight_decay} changes the stationary point multi-stage influence assumes; set it to 0.")
        self._model, self._accumulation = model, args.gradient_accumulation_steps
        self._rescaled = args.world_size if args.average_tokens_across_devices else 1

    def on_step_end(self, args, state, control, **kwargs):
        if self._calls == 0:
            raise PretraceError("the Trainer did not call PretraceCallback.loss: pass Trainer(compute_loss_func=callback.loss, ...) "
                                "so the loss is pretrace's mean over examples of summed completion losses, the scale α is on.")
        self._step_losses.append(self._step_loss)
        self._step_loss = 0.0

    def on_train_end(self, args, state, control, model=None, processing_class=None, tokenizer=None, **kwargs):
        settings = {"trainer": {k: getattr(args, k) for k in ("learning_rate", "num_train_epochs", "per_device_train_batch_size",
                                                              "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps",
                                                              "max_grad_norm", "seed")}}
        tokenizer = processing_class if processing_class is not None else tokenizer
        if tokenizer is None:
            raise PretraceError("the Trainer has no tokenizer to save with the model; pass Trainer(processing_class=tokenizer, ...).")
        # each process's losses are means over its share of every batch (equal shares: the sampler pads them), so the
        # batch's mean is the mean over processes; gathered on every process (a collective), written by the first
        per_process = all_gather_objects(self._step_losses)
        if len({len(losses) for losses in per_process}) != 1:
            raise PretraceError(f"the processes logged different numbers of steps ({[len(losses) for losses in per_process]}); they must train in step.")
        step_losses = [sum(losses) / len(losses) for losses in zip(*per_process)]
        if args.process_index == 0:
            self.proximal.save(model, tokenizer, self.out, self.data, step_losses=step_losses, settings=settings,
                               options=self.options, fields=self.fields, overwrite=self.overwrite)
        if self.factors is not None:  # every process fits its share of the batches (`fit` is collective); the first writes
            group.barrier()  # the model folder is in place
            fit(self.out, self.data, self.factors, self.options, overwrite=self.overwrite, progress=False)
