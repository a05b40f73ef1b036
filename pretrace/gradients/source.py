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
from functools import partial
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch
from torch import nn

from pretrace.data.batching import TokenBatch
from pretrace.errors import PretraceError
from pretrace.gradients.capture import CapturedBatch, capture
from pretrace.gradients.task import LanguageModelingTask, Task
from pretrace.modeling.modules import Tracked, TrackedModule

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
        parameter = next(self.model.parameters())
        half = parameter.dtype in (torch.float16, torch.bfloat16)  # where a value can overflow on the way
        for index, offset, batch in self.select(_numbered(self.batches)):
            on_device = batch.to(parameter.device)
            yield Gradients(index, offset, on_device, list(batch.ids), lambda b=on_device, i=index: self._capture(b, i, half))

    def _capture(self, batch: TokenBatch, index: int, check: bool) -> CapturedBatch:
        loss = partial(self.loss, self.model, batch, index)
        try:
            captured = capture(self.model, self.tracked, loss)
        except PretraceError:
            if check:  # an overflowed loss: run the forward again to name the module where it arose
                require_finite_inputs(self.model, self.tracked, loss, batch.ids)
            raise
        if check:
            require_finite_capture(captured, self.tracked, batch.ids)
        return captured


def _overflow(name: str, kind: str, dtype: torch.dtype, ids: Sequence[str]) -> PretraceError:
    return PretraceError(f"module {name}: its {kind} hold NaN or infinite values in {dtype} for the batch of documents "
                         f"{list(ids)[:3]}{'...' if len(ids) > 3 else ''}; float16 overflows beyond 65504: use --dtype bfloat16 or float32.")


def require_finite_inputs(model: nn.Module, tracked: Sequence[Tracked], loss_fn: Callable[[], torch.Tensor], ids: Sequence[str]) -> None:
    """Run the forward pass without gradients and refuse at the first tracked module whose inputs are not finite."""
    first: list[tuple[str, torch.dtype]] = []

    def hook(t):
        def check(_module, args):
            if not first and not bool(torch.isfinite(args[0]).all()):
                first.append((t.name, args[0].dtype))
        return check

    handles = [t.module.register_forward_pre_hook(hook(t)) for t in tracked if isinstance(t, TrackedModule)]
    try:
        with torch.no_grad():
            loss_fn()
    except PretraceError:
        pass  # the loss's own refusal: the caller raises it unless a module is named below
    finally:
        for handle in handles:
            handle.remove()
    if first:
        name, dtype = first[0]
        raise _overflow(name, "inputs", dtype, ids)


def require_finite_capture(captured: CapturedBatch, tracked: Sequence[Tracked], ids: Sequence[str]) -> None:
    """Refuse a half-precision batch whose captured inputs or output gradients overflowed, naming the module where
    it arose: the first whose inputs are not finite in the forward order, else the first whose output gradients are
    not finite in the backward order (later modules' gradients are computed first)."""
    checks = [(t, "inputs", captured.activations.get(t.name)) for t in tracked]
    checks += [(t, "output gradients", captured.output_gradients.get(t.name)) for t in reversed(tracked)]
    for t, kind, values in checks:
        if values is not None and not bool(torch.isfinite(values).all()):
            raise _overflow(t.name, kind, values.dtype, ids)


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
