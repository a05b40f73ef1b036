"""One source of per-example gradients for every loop that needs them: fitting curvature, preparing queries,
scoring documents, self-influence, storing an index, the gradient baselines.

A source is an iterable of `Gradients`: a batch's place in the stream, its documents' ids, its tokens (none for
gradients read from a store) and `captured`, its gradients as token factors (`CapturedBatch`). `LiveGradients`
captures them with one forward and backward pass per batch, only when a loop first asks for them: a loop that
skips batches (a resumed run) or needs only their shapes pays nothing for those. A store of gradients computed
earlier yields the same `Gradients`, so every loop reads it as it reads live ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch
from torch import nn

from pretrace.data.batching import TokenBatch
from pretrace.gradients.capture import CapturedBatch, capture
from pretrace.gradients.task import LanguageModelingTask, Task
from pretrace.modeling.modules import Tracked

Loss = Callable[[nn.Module, TokenBatch, int], torch.Tensor]  # (model, batch on its device, batch index) -> per-example losses [B]


class Gradients:
    """One batch of a source: `index` (its position in the stream before any split over ranks), `offset` (the
    position of its first document), `ids`, `batch` (its tokens, None for stored gradients) and `captured`."""

    def __init__(self, index: int, offset: int, batch: TokenBatch | None, ids: list[str], take: Callable[[], CapturedBatch]):
        self.index, self.offset, self.batch, self.ids = index, offset, batch, ids
        self._take, self._captured = take, None

    @property
    def captured(self) -> CapturedBatch:
        """The batch's gradients, captured on first use (never twice)."""
        if self._captured is None:
            self._captured = self._take()
        return self._captured

    def release(self) -> None:
        """Free the captured tensors before the next batch is captured: never two batches' activations at once."""
        self._captured = None


class GradientSource(Protocol):
    def __iter__(self) -> Iterator[Gradients]: ...


@dataclass
class LiveGradients:
    """Gradients captured from `model` for the batches `select` keeps of `batches` (default: all), each batch moved
    to the model's device and its per-example losses given by `loss`."""

    model: nn.Module
    tracked: Sequence[Tracked]
    batches: Iterable[TokenBatch]
    loss: Loss
    select: Callable[[Iterable], Iterable] = iter  # which (index, offset, batch) this rank takes

    def __iter__(self) -> Iterator[Gradients]:
        device = next(self.model.parameters()).device
        for index, offset, batch in self.select(_numbered(self.batches)):
            on_device = batch.to(device)
            yield Gradients(index, offset, on_device, list(batch.ids),
                            lambda b=on_device, i=index: capture(self.model, self.tracked, lambda: self.loss(self.model, b, i)))


def _numbered(batches: Iterable[TokenBatch]) -> Iterator[tuple[int, int, TokenBatch]]:
    """(index, offset of its first document, batch): numbered before any split over ranks."""
    offset = 0
    for index, batch in enumerate(batches):
        yield index, offset, batch
        offset += len(batch)


def document_loss(task: Task | None = None) -> Loss:
    """Each document's summed next-token loss (its labels the data's)."""
    task = task or LanguageModelingTask()
    return lambda model, batch, index: task.document_loss(model, batch)


def measurement(task: Task | None = None) -> Loss:
    """Each query's measurement (the summed loss of its completion, by default)."""
    task = task or LanguageModelingTask()
    return lambda model, batch, index: task.measurement(model, batch)


def sampled_document_loss(task: Task | None, seed: int, offset: int, sample: bool) -> Loss:
    """Each document's loss with labels sampled from the model (`sample`: the true Fisher) by a generator seeded from
    `seed`, the pass's `offset` and the batch index, so a resumed or split pass draws the same labels."""
    task = task or LanguageModelingTask()

    def loss(model: nn.Module, batch: TokenBatch, index: int) -> torch.Tensor:
        generator = torch.Generator(device=batch.input_ids.device).manual_seed(seed * 1_000_003 + offset + index)
        return task.document_loss(model, batch, generator=generator, sample=sample)

    return loss
