"""Similarity baselines: gradient dot product, gradient cosine (TracIn with one checkpoint), the paper's
gradient CKA, and representation similarity.

Queries are measured on the query stage and documents on the document stage, so in multi-stage scoring a
query's gradient (or hidden state) comes from the fine-tuned model and a document's from the pre-trained
one, as the paper's baselines do. Gradients come only from the shared provider (`capture`,
`query_gradients`): the summed cross-entropy of a document's tokens or of a query's completion, over the
tracked modules (all linear modules, MLP only, or every parameter: by --preset).

CKA: the paper's script scores a pair with the linear CKA of the two flattened gradients taken as 1×P
representations, uncentred: ‖x yᵀ‖²_F / (‖x xᵀ‖_F ‖y yᵀ‖_F). For single rows x xᵀ = ‖x‖², so this is
(xᵀy)² / (‖x‖² ‖y‖²) = cos²(x, y): the squared cosine, blind to the sign (a document that opposes the
query ranks as high as one that supports it). Centring, as CKA usually does, would turn a single row
into zeros, which is why the script leaves it out.
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from pretrace.curvature import Identity
from pretrace.data.batching import TokenBatch
from pretrace.errors import PretraceError
from pretrace.gradients import CapturedBatch
from pretrace.gradients.source import LiveGradients, document_loss
from pretrace.gradients.capture import compute_dtype
from pretrace.gradients.task import model_inputs
from pretrace.methods.base import Attributor, ScoringContext
from pretrace.methods.gradient import PreconditionedGradients
from pretrace.progress import progress_bar
from pretrace.scores.pairwise import query_gradients
from pretrace.scores.result import ScoreResult
from pretrace.modeling.stage import DocumentSource, Stage


def check_details(method: str, per_module: bool, per_token: bool, module_scores: bool) -> None:
    """Refuse a breakdown a method cannot give rather than silently returning none."""
    if per_token:
        raise PretraceError(f"--method {method} has no per-token contributions; they exist for gradient dot-product methods only.")
    if per_module and not module_scores:
        raise PretraceError(f"--method {method} has no per-module scores; drop --per-module.")


def require_fitted(fitted_on: DocumentSource | None, context: ScoringContext) -> None:
    """Methods that index the documents in `fit` can only score those same documents."""
    if fitted_on is None or fitted_on is not context.documents:
        raise RuntimeError("call fit() with this context's documents before score()")


def document_captures(stage: Stage, documents: DocumentSource, desc: str = "document gradients") -> Iterator[tuple[TokenBatch, CapturedBatch]]:
    """Each document batch with its captured activations and output gradients on `stage`.

    Take per-example gradients with `captured.example_gradients(name)` one module at a time, so only one
    module's `[B, d_out, d_in']` block is alive at once.
    """
    source = LiveGradients(stage.model, stage.tracked, stage.document_batches(documents)(), document_loss())
    for gradients in progress_bar(source, total=stage.document_batch_count(documents), desc=desc, unit="batch"):
        yield gradients.batch, gradients.captured


def gradient_products(stage: Stage, query_grads: dict[str, torch.Tensor], documents: DocumentSource,
                      per_module: bool = False) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """One pass over the documents: dot products with the query gradients, `[M, Q, N]` per module or
    `[1, Q, N]` summed, and every document's squared gradient norm `[N]` (float64, on the CPU)."""
    dtype = compute_dtype(stage.model)
    device = next(stage.model.parameters()).device
    names = [t.name for t in stage.tracked]
    queries = {name: query_grads[name].to(device, dtype) for name in names}
    ids: list[str] = []
    dots, norms = [], []
    for batch, captured in document_captures(stage, documents):
        batch_dots, batch_norms = [], 0
        for name in names:
            grads = captured.example_gradients(name).to(dtype)
            batch_dots.append(torch.einsum("qoi,boi->qb", queries[name], grads).double().cpu())
            batch_norms = batch_norms + grads.flatten(1).pow(2).sum(1, dtype=torch.float64).cpu()
        ids.extend(batch.ids)
        dots.append(torch.stack(batch_dots) if per_module else sum(batch_dots)[None])
        norms.append(batch_norms)
    return ids, torch.cat(dots, dim=2), torch.cat(norms)


def build_gradient_dot() -> PreconditionedGradients:
    """∇m(x)ᵀ ∇ℓ(z): identity preconditioning under the name the paper uses."""
    return PreconditionedGradients("gradient-dot", lambda context: Identity(), {"alias_of": "identity"})


class GradientCosine(Attributor):
    """cos(∇m(x), ∇ℓ(z)) over all tracked parameters: TracIn with one checkpoint and normalised gradients.
    `squared=True` is the paper's gradient CKA, cos² (see the module docstring)."""

    def __init__(self, squared: bool = False):
        self.squared = squared
        self.name = "cka" if squared else "gradient-cosine"

    def score(self, context: ScoringContext, per_module: bool = False, per_token: bool = False) -> ScoreResult:
        """Per-module scores split the total: cosine = Σ_m ∇m_mᵀ∇ℓ_m / (‖∇m‖‖∇ℓ‖), and for CKA each of
        those terms is multiplied by the cosine, so they still add up to cos²."""
        check_details(self.name, per_module, per_token, module_scores=True)
        queries, documents = context.query_stage, context.document_stage
        query_ids, grads = query_gradients(queries.model, queries.tracked, queries.query_batches(context.queries), progress=context.progress)
        start = time.perf_counter()
        document_ids, dots, document_norms = gradient_products(documents, grads, context.documents, per_module)
        names = [t.name for t in documents.tracked]
        query_norms = sum(grads[name].flatten(1).double().pow(2).sum(1).cpu() for name in names)
        denominator = query_norms.sqrt()[:, None] * document_norms.sqrt()[None, :]
        contributions = torch.where(denominator > 0, dots / denominator, torch.zeros_like(dots))
        cosine = contributions.sum(0)
        if self.squared:
            contributions = contributions * cosine
        return ScoreResult(
            scores=contributions.sum(0), query_ids=query_ids, document_ids=document_ids, module_names=names,
            per_module=contributions if per_module else None, timings={"documents_seconds": time.perf_counter() - start},
        )

    def hyperparameters(self) -> dict:
        similarity = "squared cosine of gradients (linear CKA of single gradient vectors, uncentred)" if self.squared else "cosine of gradients"
        return {"similarity": similarity, "zero_gradient_score": 0.0}


def pooled_hidden_states(stage: Stage, batches: Iterable[TokenBatch], layer: int, total: int | None = None,
                         desc: str = "representations") -> tuple[list[str], torch.Tensor]:
    """Mean over non-padding tokens of `hidden_states[layer]` (0: embeddings, i: after block i, -1: the
    last, which Hugging Face returns after the final norm): ids and `[N, hidden]` float64."""
    model = stage.model
    body = getattr(model, "base_model", model)  # the LM head is not needed for hidden states
    device = next(model.parameters()).device
    ids, rows = [], []
    with torch.no_grad():
        for batch in progress_bar(batches, total=total, desc=desc, unit="batch"):
            batch = batch.to(device)
            hidden = body(**model_inputs(body, batch), output_hidden_states=True).hidden_states
            if not -len(hidden) <= layer < len(hidden):
                raise PretraceError(f"--representation-layer {layer} is out of range: the model has hidden states 0..{len(hidden) - 1} "
                                    f"(0 = embeddings, {len(hidden) - 1} or -1 = last layer).")
            mask = batch.attention_mask.unsqueeze(-1).double()
            rows.append(((hidden[layer].double() * mask).sum(1) / mask.sum(1)).cpu())
            ids.extend(batch.ids)
    return ids, torch.cat(rows)


class RepresentationSimilarity(Attributor):
    """Cosine similarity of mean-pooled hidden states: the query's prompt + completion on the query stage,
    each document on the document stage. Documents are embedded once in `fit`."""

    name = "representation"
    reads_document_loss = False

    def __init__(self, layer: int = -1):
        self.layer = layer
        self.document_ids: list[str] = []
        self._documents: torch.Tensor | None = None
        self._fitted_on: DocumentSource | None = None

    def fit(self, context: ScoringContext) -> None:
        stage = context.document_stage
        batches = stage.document_batches(context.documents)()
        self.document_ids, vectors = pooled_hidden_states(stage, batches, self.layer, stage.document_batch_count(context.documents), "document representations")
        self._documents = F.normalize(vectors, dim=1)
        self._fitted_on = context.documents

    def score(self, context: ScoringContext, per_module: bool = False, per_token: bool = False) -> ScoreResult:
        check_details(self.name, per_module, per_token, module_scores=False)
        require_fitted(self._fitted_on, context)
        stage = context.query_stage
        query_ids, vectors = pooled_hidden_states(stage, stage.query_batches(context.queries), self.layer, desc="query representations")
        scores = F.normalize(vectors, dim=1) @ self._documents.T
        return ScoreResult(scores=scores, query_ids=query_ids, document_ids=list(self.document_ids), module_names=[])

    def hyperparameters(self) -> dict:
        return {"layer": self.layer, "pooling": "mean over non-padding tokens", "similarity": "cosine",
                "query_tokens": "prompt + completion"}
