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

import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from pretrace.data.batching import encode_queries
from pretrace.data.records import read_queries
from pretrace.errors import PretraceError
from pretrace.modeling.loading import model_fingerprint
from pretrace.storage import file_sha256
from pretrace.training.finetune import FINETUNE_RECORD, LOSS_NORMALISATION, OBJECTIVE, ProximityPenalty
from pretrace.training.output import save_model_folder
from pretrace.workflows.fit import fit

IGNORE_INDEX = -100  # Hugging Face's label for "no loss here"


class ProximalFinetuning:
    """θ_pt and α for a hand-written loop: add `penalty(model)` to each batch's mean-over-examples loss
    before `backward()`, then call `save(...)`.

    Construct it before the first optimizer step: the weights at construction are θ_pt."""

    def __init__(self, model: torch.nn.Module, alpha: float, pretrained: str | Path):
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise PretraceError(f"alpha must be a finite number >= 0 (0: no proximity term), got {alpha!r}.")
        self.alpha, self.pretrained = float(alpha), Path(pretrained)
        self._penalty = ProximityPenalty(model, self.alpha)
        self.pretrained_fingerprint = model_fingerprint(model)

    @property
    def anchor(self) -> dict[str, torch.Tensor]:
        return self._penalty.anchor

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        return self._penalty(model)

    def save(self, model: torch.nn.Module, tokenizer, out: str | Path, data: str | Path, *, steps: int,
             final_train_loss: float | None = None, settings: dict | None = None, factors: str | Path | None = None,
             options=None, overwrite: bool = False) -> Path:
        """Write the fine-tuned model folder with its record; with `factors`, also fit the fine-tuned EK-FAC
        factors there on `data` (the fine-tuning examples, completion tokens only), as `pretrace fit` would."""
        examples = read_queries(data)
        record = {
            "alpha": self.alpha,
            "loss_normalisation": LOSS_NORMALISATION,
            "objective": OBJECTIVE,
            "pretrained_path": str(self.pretrained.resolve()),
            "pretrained_fingerprint": self.pretrained_fingerprint,
            "data": str(Path(data).resolve()),
            "data_sha256": file_sha256(data),
            "examples": len(examples),
            "steps": steps,
            "final_train_loss": final_train_loss,
            "settings": settings or {},
        }
        folder = save_model_folder(out, model, tokenizer, FINETUNE_RECORD, record, overwrite)
        if factors is not None:
            fit(folder, data, factors, options, overwrite=overwrite, progress=False)
        return folder


def trainer_examples(tokenizer, data: str | Path, max_length: int = 512) -> list[dict[str, list[int]]]:
    """The fine-tuning examples tokenized exactly as `pretrace finetune` does, as Trainer rows: `labels`
    hold the completion tokens and IGNORE_INDEX elsewhere."""
    rows = []
    for item in encode_queries(tokenizer, read_queries(data), max_length):
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

    The proximity gradient α(θ − θ_pt) is added to each parameter's gradient during every backward pass,
    divided by the gradient-accumulation steps like the loss, so it is in place before gradient clipping
    and the optimizer step, exactly as if α/2‖θ − θ_pt‖² were part of the loss. Keep dropout off (the
    derivation needs the deterministic objective's stationary point) and weight decay 0.
    """

    def __init__(self, model: torch.nn.Module, alpha: float, pretrained: str | Path, data: str | Path, out: str | Path,
                 factors: str | Path | None = None, options=None, overwrite: bool = False):
        self.proximal = ProximalFinetuning(model, alpha, pretrained)
        self.data, self.out, self.factors, self.options, self.overwrite = data, out, factors, options, overwrite
        self._accumulation = 1
        self._loss_calls = 0
        self._hooks: list[Any] = []

    def loss(self, outputs, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        """Summed next-token cross-entropy of each example's labelled tokens, averaged over the examples of the
        (accumulated) batch: the `Trainer(compute_loss_func=...)` for pretrace's objective."""
        self._loss_calls += 1
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        targets = labels[:, 1:].to(logits.device)
        summed = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return summed / (labels.shape[0] * self._accumulation)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.weight_decay != 0:
            raise PretraceError(f"weight_decay={args.weight_decay} changes the stationary point multi-stage influence assumes; set it to 0.")
        self._accumulation = args.gradient_accumulation_steps
        alpha, scale = self.proximal.alpha, 1.0 / self._accumulation
        if alpha > 0:
            for name, parameter in model.named_parameters():
                anchor = self.proximal.anchor.get(name)
                if anchor is not None:
                    pull = lambda grad, p=parameter, a=anchor: grad + (alpha * scale) * (p.detach() - a)  # noqa: E731
                    self._hooks.append(parameter.register_hook(pull))

    def on_step_end(self, args, state, control, **kwargs):
        if self._loss_calls == 0:
            raise PretraceError("the Trainer did not call PretraceCallback.loss: pass Trainer(compute_loss_func=callback.loss, ...) "
                                "so the loss is pretrace's mean over examples of summed completion losses, the scale α is on.")

    def on_train_end(self, args, state, control, model=None, processing_class=None, tokenizer=None, **kwargs):
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        settings = {"trainer": {k: getattr(args, k) for k in ("learning_rate", "num_train_epochs", "per_device_train_batch_size",
                                                              "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps",
                                                              "max_grad_norm", "seed")}}
        tokenizer = processing_class if processing_class is not None else tokenizer
        if tokenizer is None:
            raise PretraceError("the Trainer has no tokenizer to save with the model; pass Trainer(processing_class=tokenizer, ...).")
        if args.process_index == 0:
            self.proximal.save(model, tokenizer, self.out, self.data, steps=state.global_step,
                               final_train_loss=sum(losses[-50:]) / len(losses[-50:]) if losses else None,
                               settings=settings, factors=self.factors, options=self.options, overwrite=self.overwrite)

