"""What is differentiated: the training loss of a document and the measurement of a query.

Both default to the summed cross-entropy of the target tokens (a document: all tokens; a query: the
completion). Subclass `Task` to measure something else (a classification head's loss on the fine-tuned
model, say) while documents keep the language-modelling loss.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from pretrace.data.batching import TokenBatch
from pretrace.errors import PretraceError


def model_inputs(model: nn.Module, batch: TokenBatch) -> dict:
    """Forward arguments with explicit positions, so left- and right-padded batches give the same result
    (BLOOM's ALiBi takes no position ids: it derives positions from the attention mask itself)."""
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if "position_ids" in inspect.signature(model.forward).parameters:
        inputs["position_ids"] = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return inputs


def token_logits(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """[B, T, V] logits at every position."""
    return model(**model_inputs(model, batch)).logits


def dtype_hint(model_dtype: torch.dtype) -> str:
    """The --dtype worth trying when a model's numbers overflow: a wider one than it already has, if any
    (suggesting float32 to a float32 model would send the user in a circle)."""
    wider = {torch.float16: "float32", torch.bfloat16: "float32", torch.float32: "float64"}.get(model_dtype)
    return f" (or load the model with --dtype {wider})" if wider else ""


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] sum over masked positions of -log p(label); logits at a position predict that position's label."""
    log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    picked = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    losses = -torch.where(mask, picked, torch.zeros_like(picked)).sum(dim=-1)
    if not torch.isfinite(losses).all():
        raise PretraceError(f"the loss is NaN or infinite for some sequence; check the model weights{dtype_hint(logits.dtype)}.")
    return losses.to(logits.dtype)


def sample_labels(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution (the true-Fisher estimator), by the
    Gumbel-max trick: exact softmax sampling in one vectorised pass (torch.multinomial is far slower on CPU)."""
    scores = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
    uniform = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=scores.dtype)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(scores.dtype).tiny)))
    return (scores + gumbel).argmax(dim=-1)


class Task:
    """Defines the differentiated quantities; `sample=True` asks for labels drawn from the model (Fisher)."""

    def document_loss(self, model: nn.Module, batch: TokenBatch, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def measurement(self, model: nn.Module, batch: TokenBatch) -> torch.Tensor:
        raise NotImplementedError


class LanguageModelingTask(Task):
    """Summed next-token cross-entropy over each sequence's target tokens, for documents and queries alike."""

    def document_loss(self, model, batch, generator=None, sample=False):
        logits = token_logits(model, batch)
        mask = batch.predict_mask
        labels = sample_labels(logits, generator) if sample else batch.next_tokens
        return summed_cross_entropy(logits, labels, mask)

    def measurement(self, model, batch):
        return self.document_loss(model, batch)
