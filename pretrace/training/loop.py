"""One causal-LM training loop shared by pre-training, fine-tuning and retraining baselines.

AdamW with a learning rate that rises linearly over the warm-up steps and then follows a cosine to 0,
both counted in optimizer steps (not epochs), gradient-norm clipping, and seeded shuffling. The loss of
a batch is one of two normalisations of the per-sequence summed cross-entropy ℓ_i of its target tokens:

- "token":    Σ_i w_i ℓ_i / Σ_i n_i   (mean per target token; n_i counts sequence i's target tokens)
- "sequence": Σ_i w_i ℓ_i / B         (mean per sequence, B sequences in the batch)

w_i is an optional per-document weight (default 1; 0 removes a document, as retraining baselines need),
and the denominators never depend on the weights. An optional `regulariser(model)` is added to every
batch's loss, so its scale is that of the mean objective being minimised.

Under torchrun each rank takes every world-th sequence of each (global) batch, divides its summed losses
by the *global* batch's denominator and back-propagates; the ranks' gradients are then summed (an
all-reduce, as DDP does), the regulariser's gradient is added once, and every rank takes the same
optimizer step. With the same global batch size this is the single-process run up to the order float
sums are added (dropout aside: each rank draws its own masks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from pretrace.parallel import collectives, group
from pretrace.data.batching import Encoded, TokenBatch, collate
from pretrace.errors import PretraceError
from pretrace.gradients.task import LanguageModelingTask
from pretrace.progress import progress_bar
from pretrace.settings.training import TrainSettings

NORMALISATIONS = ("token", "sequence")


@dataclass
class TrainHistory:
    """Per optimizer step: the data loss (without the regulariser) and the learning rate it used."""

    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    validation_losses: list[float] = field(default_factory=list)  # one per epoch, when validation data is given

    @property
    def steps(self) -> int:
        return len(self.losses)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak rate at 0-based optimizer step `step`: linear warm-up, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def sequence_losses(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """[B] summed cross-entropy over each sequence's target tokens (the same loss influence scores use)."""
    return LanguageModelingTask().document_loss(model, batch)


def batch_loss(losses: torch.Tensor, batch: TokenBatch, normalisation: str, weights: Mapping[str, float] | None = None,
               denominator: int | None = None) -> torch.Tensor:
    """Scalar training loss of a batch from its [B] summed losses (see the module docstring).

    `denominator` (from `loss_denominator`) replaces the batch's own when `batch` is one rank's share of a batch."""
    if weights is not None:
        losses = losses * torch.tensor([float(weights.get(i, 1.0)) for i in batch.ids], dtype=losses.dtype, device=losses.device)
    if denominator is not None:
        return losses.sum() / denominator
    if normalisation == "token":
        return losses.sum() / batch.target_mask.sum().clamp(min=1)
    if normalisation == "sequence":
        return losses.sum() / len(batch)
    raise PretraceError(f"unknown loss normalisation {normalisation!r}; choose one of {list(NORMALISATIONS)}.")


def loss_denominator(items: Sequence[Encoded], normalisation: str) -> int:
    """What a batch of `items` divides its summed losses by: their target tokens, or their number."""
    if normalisation == "token":
        return max(1, sum(sum(item.target_mask) for item in items))
    return len(items)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _data_loss(model: torch.nn.Module, mine: Sequence[Encoded], denominator: int, normalisation: str,
               weights: Mapping[str, float] | None, pad_id: int, device: torch.device) -> float:
    """Back-propagate this rank's share of a batch's loss; return the whole batch's loss (summed over ranks)."""
    loss = torch.zeros((), dtype=torch.float64)
    if mine:  # a short last batch can leave a rank without sequences
        batch = collate(mine, pad_id).to(device)
        share = batch_loss(sequence_losses(model, batch), batch, normalisation, weights, denominator)
        share.backward()
        loss = share.detach().double().cpu()
    return float(collectives.all_reduce_sums({"loss": loss})["loss"])


@torch.no_grad()
def evaluate(model: torch.nn.Module, items: Sequence[Encoded], batch_size: int, pad_id: int, normalisation: str = "token", progress: bool = False) -> float:
    """Mean loss over all of `items` (per target token, or per sequence), with dropout off."""
    if not items:
        raise PretraceError("no evaluation data; pass at least one document.")
    was_training, total = model.training, torch.zeros((), dtype=torch.float64)
    model.eval()
    starts = collectives.shard(range(0, len(items), batch_size))  # each rank its share of the batches
    for start in progress_bar(starts, desc="evaluate", unit="batch", enabled=progress and group.is_main(), leave=False):
        batch = collate(items[start : start + batch_size], pad_id).to(_device(model))
        total += sequence_losses(model, batch).sum().double().cpu()
    model.train(was_training)
    total = float(collectives.all_reduce_sums({"loss": total})["loss"])
    return total / loss_denominator(items, normalisation)


def _require_finite(model: torch.nn.Module, loss: float, step: int, settings: TrainSettings) -> None:
    """Stop at the first step whose loss or weights are NaN or infinite: training on from there would only save a
    broken model (and every influence score of it would be NaN)."""
    broken = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if math.isfinite(loss) and not broken:
        return
    what = f"weights ({', '.join(broken[:2])}{', ...' if len(broken) > 2 else ''})" if broken else "loss"
    raise PretraceError(f"training diverged at step {step}: its {what} became NaN or infinite, so nothing was saved; lower --lr "
                        f"({settings.lr:g}) or the proximity --alpha, or train in --dtype float32 (float16 overflows easily).")


def train(
    model: torch.nn.Module,
    items: Sequence[Encoded],
    settings: TrainSettings,
    pad_id: int,
    *,
    normalisation: str = "token",
    weights: Mapping[str, float] | None = None,
    regulariser: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    validation: Sequence[Encoded] | None = None,
    dropout: bool = True,
    progress: bool = True,
) -> TrainHistory:
    """Train `model` in place on `items` (on the model's device); returns the per-step history.

    `weights` maps document ids to loss weights; `dropout=False` trains the deterministic model, whose
    stationary point is what influence functions linearise around.
    """
    if not items:
        raise PretraceError("no training data; pass at least one document.")
    if normalisation not in NORMALISATIONS:
        raise PretraceError(f"unknown loss normalisation {normalisation!r}; choose one of {list(NORMALISATIONS)}.")
    torch.manual_seed(settings.seed)
    shuffler = torch.Generator().manual_seed(settings.seed)
    batches_per_epoch = math.ceil(len(items) / settings.batch_size)
    total_steps = settings.epochs * batches_per_epoch
    warmup_steps = round(settings.warmup * total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_steps))
    history, device = TrainHistory(), _device(model)
    bar = progress_bar(total=total_steps, desc="train", unit="step", enabled=progress and group.is_main())
    for epoch in range(settings.epochs):
        model.train(dropout)
        order = torch.randperm(len(items), generator=shuffler).tolist()
        for start in range(0, len(order), settings.batch_size):
            chosen = [items[i] for i in order[start : start + settings.batch_size]]
            optimizer.zero_grad(set_to_none=True)
            data_loss = _data_loss(model, list(collectives.shard(chosen)), loss_denominator(chosen, normalisation),
                                   normalisation, weights, pad_id, device)
            collectives.all_reduce_gradients(trainable)
            if regulariser is not None:
                regulariser(model).backward()  # after the all-reduce: identical on every rank, added once
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
            history.learning_rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
            _require_finite(model, data_loss, len(history.losses) + 1, settings)
            history.losses.append(data_loss)
            bar.update()
            bar.set_postfix(loss=f"{history.losses[-1]:.4f}", lr=f"{history.learning_rates[-1]:.2e}")
        if validation:
            history.validation_losses.append(evaluate(model, validation, settings.batch_size, pad_id, normalisation))
            if progress:
                bar.write(f"epoch {epoch + 1}: validation loss {history.validation_losses[-1]:.4f}")
    bar.close()
    model.eval()
    return history
