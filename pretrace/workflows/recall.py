"""The recall stage of two-stage influence (`trace --retriever gradient`): every corpus document's gradient on the
pre-trained model sketched once into a corpus store (whitened by the pre-trained curvature), and each query's
top K by its sketched multi-stage score; the exact multi-stage EK-FAC score then ranks those K."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from pretrace.methods.base import ScoringContext
from pretrace.methods.gradient import PreconditionedGradients
from pretrace.modeling.stage import ModelOptions
from pretrace.scores.index import IndexSettings
from pretrace.scores.plan import ScoringPlan
from pretrace.store import CorpusStore
from pretrace.workflows.index import index


def build_corpus_store(pretrained: str, corpus: str, folder: Path, pretrained_factors: str, sketch_dim: int, options: ModelOptions,
                       progress: bool) -> None:
    """The store of the corpus under the pre-trained model (resumes a killed build; refused if it holds another)."""
    index(pretrained, corpus, folder, options, IndexSettings(storage="sketch", sketch_dim=sketch_dim), overwrite=False, progress=progress,
          factors=pretrained_factors)


def store_candidates(store: CorpusStore, attributor: PreconditionedGradients, context: ScoringContext, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Per query its `k` documents of highest sketched score (store indices, best first) and those scores: the
    fitted attributor's preconditioned query weights (multi-stage: on the fine-tuned model) sketched as the store's
    queries are."""
    _, weights = attributor.precondition_queries(replace(context, plan=ScoringPlan()))
    scores, indices = store.search(store.sketch(weights).float(), min(k, len(store)))
    return indices.tolist(), scores.to(torch.float64).tolist()
