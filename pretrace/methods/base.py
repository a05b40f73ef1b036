"""The interface every attribution method follows (scikit-learn style: configure, fit, score)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pretrace.data.records import Query
from pretrace.gradients.task import Task
from pretrace.scores.result import ScoreResult
from pretrace.scores.plan import ScoringPlan
from pretrace.modeling.stage import DocumentSource, ModelOptions, Stage


@dataclass
class ScoringContext:
    """What a method may use: the stage queries are measured on, the stage documents are scored on
    (the same stage for single-stage influence; none for the text methods, which load no model), the documents,
    the queries, how records are read and where models run (`options`), the multi-stage α, optional curvature
    data, how scoring is laid out over ranks and memory (`plan`: gradient methods follow it), and what a query's
    measurement is (`task`; default: its completion's loss; read by the methods that precondition queries)."""

    query_stage: Stage | None
    document_stage: Stage | None
    documents: Path | DocumentSource
    queries: list[Query]
    extra: dict = field(default_factory=dict)
    plan: ScoringPlan = field(default_factory=ScoringPlan)
    options: ModelOptions | None = None
    alpha: float | None = None
    task: Task | None = None
    progress: bool = True

    def __post_init__(self):
        if self.options is None:
            self.options = self.document_stage.options


class Attributor:
    """Scores `[queries × documents]`; larger = the document supports the query's completion more."""

    name = "base"
    # declared, not probed: True for methods whose `precondition_queries(context)` gives per-query weights that the
    # shared scoring loop streams documents against (what --index, --self-influence and explanations need)
    preconditions_queries = False
    # declared: False for methods that score a document's words or hidden states, not its loss, so a document of
    # one token (no next-token target) is still scored and not reported as too short
    reads_document_loss = True

    def fit(self, context: ScoringContext) -> None:
        """One-off work independent of the queries (fitting curvature, indexing, training an ensemble)."""

    def score(self, context: ScoringContext, per_module: bool = False, per_token: bool = False) -> ScoreResult:
        raise NotImplementedError

    def hyperparameters(self) -> dict:
        return {}
