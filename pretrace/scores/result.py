"""What a scoring run gives back: `[queries × documents]` scores named by their ids, ways to read them, and the
top documents' explanations."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pretrace.errors import PretraceError
from pretrace.extras import require
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

    def zero_documents(self, ids: set[str]) -> None:
        """Score 0 for documents without a loss (a ratio such as the gradient cosine would make them NaN)."""
        columns = [i for i, doc_id in enumerate(self.document_ids) if doc_id in ids]
        self.scores[:, columns] = 0
        if self.per_module is not None:
            self.per_module[:, :, columns] = 0
        if self.self_influence is not None:
            self.self_influence[columns] = 0

    def require_nonzero(self, settings_used: str) -> None:
        """Refuse scores that are all exactly 0: preconditioned query gradients that underflowed (a damping far above
        the curvature's eigenvalues, or a tiny α) would make any ranking arbitrary. `settings_used` names them."""
        if self.scores.numel() and not bool(self.scores.any()):
            raise PretraceError(f"every one of the {self.scores.numel()} scores is exactly 0, so nothing was written: the preconditioned query "
                                f"gradients underflowed ({settings_used}); lower --damping or --damping-factor (λ should be near the "
                                "curvature's mean eigenvalue, see `pretrace inspect FACTORS`).")

    def record_phases(self, start: float, fitted: float, scored: float) -> None:
        """Into `timings`: the one-off, scoring and explanation seconds (explanations taken during the pass are not
        scoring's cost); times from `time.perf_counter()`, the explanations' ending now."""
        timings = dict(self.timings)
        in_pass = timings.pop("explanation_seconds", 0.0)
        in_pass_cpu = timings.pop("explanation_cpu_seconds", None)
        self.timings = {
            **timings,
            **({} if in_pass_cpu is None else {"explanation_in_pass_cpu_seconds": in_pass_cpu}),
            "one_off_seconds": fitted - start,
            "scoring_seconds": scored - fitted - in_pass,
            "per_query_seconds": (scored - fitted - in_pass) / max(1, len(self.query_ids)),
            "explanation_seconds": in_pass + time.perf_counter() - scored,
        }

    def top(self, k: int = 10) -> dict[str, list[tuple[str, float]]]:
        """Per query id, its `k` highest-scoring documents as (document id, score), best first (ties: document order)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise PretraceError(f"top(k): k must be a positive integer, got {k!r}.")
        indices = top_indices(self.scores, k)
        return {query: [(self.document_ids[d], float(self.scores[q, d])) for d in indices[q].tolist()]
                for q, query in enumerate(self.query_ids)}

    def to_pandas(self, form: str = "long"):
        """The scores as a `pandas.DataFrame`. `long` (the default, what joins and group-bys want): one row per
        (query, document) pair with columns query_id, document_id, score and rank (1 = the query's best; ties by
        document order), sorted by query then rank. `wide`: the matrix, queries as the index and documents as columns."""
        if form not in ("long", "wide"):
            raise PretraceError(f"to_pandas(form={form!r}): choose 'long' (one row per query and document) or 'wide' (the matrix).")
        require("pandas", purpose="to_pandas()")
        import pandas

        matrix = self.scores.double()
        if form == "wide":
            return pandas.DataFrame(matrix.numpy(), index=pandas.Index(self.query_ids, name="query_id"),
                                    columns=pandas.Index(self.document_ids, name="document_id"))
        order = top_indices(matrix, matrix.shape[1])  # [Q, N] document indices, best first
        queries, documents = len(self.query_ids), len(self.document_ids)
        return pandas.DataFrame({
            "query_id": [query for query in self.query_ids for _ in range(documents)],
            "document_id": [self.document_ids[d] for d in order.flatten().tolist()],
            "score": matrix.gather(1, order).flatten().numpy(),
            "rank": list(range(1, documents + 1)) * queries,
        })
