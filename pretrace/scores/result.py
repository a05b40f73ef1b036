"""What a scoring run gives back: `[queries × documents]` scores named by their ids, ways to read them, and the
top documents' explanations."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pretrace.errors import PretraceError
from pretrace.scores.explanations import Explanation


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[Q, min(k, N)] indices of the highest scores, ties broken by document order."""
    k = min(k, scores.shape[1])
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, :k]


@dataclass
class ScoreResult:
    """score(z, x) = ∇m(x)ᵀ P ∇ℓ(z) for every query x (a row) and document z (a column): larger, the document
    supports the query's completion more. Rows and columns are named by `query_ids` and `document_ids`."""

    scores: torch.Tensor  # [Q, N] float64
    query_ids: list[str]
    document_ids: list[str]
    module_names: list[str]
    per_module: torch.Tensor | None = None  # [M, Q, N]
    per_token: list[torch.Tensor] | None = None  # per document [Q, T_doc]
    document_token_ids: list[list[int]] | None = None
    self_influence: torch.Tensor | None = None  # [N]
    timings: dict = field(default_factory=dict)
    explanations: dict[tuple[int, int], Explanation] | None = None  # (query, document): at least each query's top k asked for

    def top(self, k: int = 10) -> dict[str, list[tuple[str, float]]]:
        """Per query id, its `k` highest-scoring documents as (document id, score), best first (ties: document order)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise PretraceError(f"top(k): k must be a positive integer, got {k!r}.")
        indices = top_indices(self.scores, k)
        return {query: [(self.document_ids[d], float(self.scores[q, d])) for d in indices[q].tolist()]
                for q, query in enumerate(self.query_ids)}

    def to_pandas(self):
        """The scores as a `pandas.DataFrame`: one row per query, one column per document, labelled by their ids."""
        try:
            import pandas
        except ImportError:
            raise PretraceError("to_pandas() needs pandas: pip install 'pretrace[formats]'.") from None
        return pandas.DataFrame(self.scores.double().numpy(), index=pandas.Index(self.query_ids, name="query_id"),
                                columns=pandas.Index(self.document_ids, name="document_id"))
