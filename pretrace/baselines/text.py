"""Text-only baselines: BM25 and sentence-embedding cosine between a query's text (prompt + completion)
and each document, scored by the `pretrace.retrieval` indexes. No model gradients are involved; the
index is built in `fit` (the one-off cost) and every query is scored against all documents."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from pretrace.baselines.similarity import require_fitted
from pretrace.methods.base import Attributor, ScoringContext
from pretrace.retrieval import make_retriever
from pretrace.scores.result import ScoreResult
from pretrace.modeling.stage import DocumentSource, iter_source


class TextRetrievalScores(Attributor):
    """Scores are the retriever's own: a BM25 score or a cosine similarity of sentence embeddings.

    `index_folder` keeps the index for reuse (refused if it holds another corpus); without it BM25 stays
    in memory and embeddings go to a temporary folder removed with this object.
    """

    reads_document_loss = False

    def __init__(self, kind: str, index_folder: str | Path | None = None, model: str | Path | None = None, **options):
        self.name, self.index_folder, self.model, self.options = kind, index_folder, model, options
        self.retriever = None
        self.document_ids: list[str] = []
        self._scratch: tempfile.TemporaryDirectory | None = None
        self._fitted_on: DocumentSource | None = None

    def fit(self, context: ScoringContext) -> None:
        documents = list(iter_source(context.documents, context.options.fields()))
        self.document_ids = [doc.id for doc in documents]
        texts = [doc.text for doc in documents]
        if self.name == "embedding":
            folder = self.index_folder
            if folder is None:
                self._scratch = tempfile.TemporaryDirectory(prefix="pretrace-embeddings-")
                folder = self._scratch.name
            device = str(context.options.torch_device())
            self.retriever = make_retriever("embedding", texts, folder=folder, model=self.model, device=device, **self.options)
        else:
            self.retriever = make_retriever(self.name, texts, folder=self.index_folder, **self.options)
        self._fitted_on = context.documents

    def score(self, context: ScoringContext, per_module: bool = False, per_token: bool = False) -> ScoreResult:
        require_fitted(self._fitted_on, context)
        count = len(self.document_ids)
        indices, values = self.retriever.search([query.text for query in context.queries], count)
        scores = torch.zeros(len(context.queries), count, dtype=torch.float64).scatter_(1, indices, values.double())
        return ScoreResult(scores=scores, query_ids=[q.id for q in context.queries], document_ids=list(self.document_ids), module_names=[])

    def hyperparameters(self) -> dict:
        described = {"retriever": self.name, "query_text": "prompt + completion", "index": None if self.index_folder is None else str(self.index_folder), **self.options}
        if self.name == "embedding":
            described["model"] = str(self.retriever.manifest["model"]) if self.retriever is not None else self.model
        return described
