"""Pairwise influence `[queries × documents]` as dot products of preconditioned query gradients with
per-document gradients built from captured activations and output gradients.

score(z, x) = ∇m(x)ᵀ P ∇ℓ(z): positive means up-weighting document z lowers the query's loss (z supports
the completion). Query gradients are materialised once (`[Q, d_out, d_in']` per module); a document's
gradient never has to be: the cheaper of "materialise per document" and "contract tokens directly"
is chosen per module and batch (see `weights.py`), and the per-token route also yields each token's contribution.
"""

from __future__ import annotations

import re
import time
from typing import Iterable, Mapping

import torch

from pretrace.data.batching import TokenBatch
from pretrace.gradients.capture import compute_dtype
from pretrace.gradients.source import LiveGradients, document_loss, measurement
from pretrace.gradients.task import LanguageModelingTask, Task
from pretrace.modeling.modules import TrackedModule
from pretrace.parallel.collectives import gather_in_order
from pretrace.parallel.group import is_main
from pretrace.progress import progress_bar
from pretrace.scores.checkpoint import BatchScores
from pretrace.scores.columns import ScoreColumns
from pretrace.scores.explanations import Explain, TopExplanations
from pretrace.scores.plan import ScoringPlan
from pretrace.scores.result import ScoreResult
from pretrace.scores.weights import ModuleWeights, as_module_weights


def query_gradients(
    model: torch.nn.Module,
    tracked: list[TrackedModule],
    batches: Iterable[TokenBatch],
    task: Task | None = None,
    progress: bool = False,
    plan: ScoringPlan | None = None,
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Gradients of each query's measurement: ids and per module `[Q, d_out, d_in']` (this rank's queries
    only when `plan` splits queries)."""
    task, plan = task or LanguageModelingTask(), plan or ScoringPlan()
    device, dtype = next(model.parameters()).device, compute_dtype(model)
    ids: list[str] = []
    parts: dict[str, list[torch.Tensor]] = {t.name: [] for t in tracked}
    for gradients in progress_bar(LiveGradients(model, tracked, plan.shard_queries(batches), measurement(task)), desc="query gradients", unit="batch", enabled=progress):
        ids.extend(gradients.ids)
        for t in tracked:
            parts[t.name].append(gradients.captured.example_gradients(t.name).to(dtype))
    empty = {t.name: torch.zeros(0, t.d_out, t.d_in_total, device=device, dtype=dtype) for t in tracked}  # a rank may hold no query
    return ids, {name: torch.cat(chunks) if chunks else empty[name] for name, chunks in parts.items()}


def score_documents(
    model: torch.nn.Module,
    tracked: list[TrackedModule],
    preconditioned: dict[str, torch.Tensor | ModuleWeights],
    batches: Iterable[TokenBatch],
    query_ids: list[str],
    task: Task | None = None,
    per_module: bool = False,
    per_token: bool = False,
    num_batches: int | None = None,
    progress: bool = False,
    plan: ScoringPlan | None = None,
    explain: Explain | None = None,
) -> ScoreResult:
    """Scores of preconditioned query gradients (tensors `[Q, d_out, d_in']` or `ModuleWeights`) against every
    document's loss gradient: `score_weight_sets` with one set."""
    return score_weight_sets(model, tracked, {"scores": (query_ids, preconditioned)}, batches, task, per_module, per_token,
                             num_batches, progress, plan, explain)["scores"]


def score_weight_sets(
    model: torch.nn.Module,
    tracked: list[TrackedModule],
    weight_sets: Mapping[str, tuple[list[str], dict[str, torch.Tensor | ModuleWeights]]],
    batches: Iterable[TokenBatch],
    task: Task | None = None,
    per_module: bool = False,
    per_token: bool = False,
    num_batches: int | None = None,
    progress: bool = False,
    plan: ScoringPlan | None = None,
    explain: Explain | None = None,
) -> dict[str, ScoreResult]:
    """Each named set of preconditioned query weights (query ids, per module tensors `[Q, d_out, d_in']` or
    `ModuleWeights`) against every document's loss gradient, in one pass: a batch's gradients are captured
    once and met by every set (e.g. multi-stage, pre-trained-only and gradient-dot weights of the same
    queries). `num_batches` lets eigenbasis weights choose their cheaper form for the stream; `ModuleWeights`
    entries of each set's dict are replaced by the form chosen (on the model's device and dtype). `plan` says
    what the ranks split and whether the scores stream to disk (default: documents, in RAM). `explain`: each
    query's top documents also get their per-token and per-module contributions, from this same pass."""
    plan = plan or ScoringPlan()
    device, dtype = next(model.parameters()).device, compute_dtype(model)
    scoring = _Pass(weight_sets, [t.name for t in tracked], device, dtype, plan, explain, per_module, per_token)
    source = LiveGradients(model, tracked, batches, document_loss(task), select=plan.shard_documents)
    start = time.perf_counter()
    bar = progress_bar(total=plan.document_shard_size(num_batches), desc="scoring documents", unit="batch", enabled=progress and is_main(),
               initial=scoring.resumed)
    for position, gradients in enumerate(source):
        if position == 0:  # the first batch tells the padded tokens to expect: weights take their cheapest form for them
            expected = None if num_batches is None else plan.document_shard_size(num_batches) * gradients.batch.input_ids.numel()
            scoring.settle(weight_sets, expected)
        if position < scoring.resumed:  # scored before the restart (the first batch still settles the weights, as then)
            continue
        scoring.score(gradients)
        gradients.release()  # before the next batch is captured: never two batches' activations at once
        bar.update(1)
    bar.close()
    return scoring.results(time.perf_counter() - start)


class _Pass:
    """One scoring pass of several weight sets: the score columns they fill, their running explanations, the batches
    done (restored from a checkpoint first) and the saves of the checkpoint."""

    def __init__(self, weight_sets: Mapping, tracked: list[str], device: torch.device, dtype: torch.dtype, plan: ScoringPlan,
                 explain: Explain | None, per_module: bool, per_token: bool):
        self.sets = {label: (list(ids), {name: as_module_weights(w).to(device, dtype) for name, w in weights.items()})
                     for label, (ids, weights) in weight_sets.items()}
        self.names = {label: [name for name in tracked if name in weights] for label, (_, weights) in self.sets.items()}
        self.labels, self.plan, self.per_module, self.per_token = list(self.sets), plan, per_module, per_token
        column = (lambda label, kind: kind) if len(self.sets) == 1 else (lambda label, kind: f"{re.sub(r'[^A-Za-z0-9_.@-]', '_', label)}-{kind}")  # noqa: E731
        self.totals = {label: ScoreColumns(column(label, "scores"), plan) for label in self.sets}
        self.modules = {label: ScoreColumns(column(label, "per_module"), plan) for label in self.sets} if per_module else None
        self.tops = {label: TopExplanations(explain, plan.query_positions(len(ids))) for label, (ids, _) in self.sets.items()} if explain else {}
        self.records = [_light(done) for done in _resume(plan, self.labels, self.totals, self.modules, self.tops)]  # the blocks are in the columns
        self.resumed, self.unsaved = len(self.records), []

    def settle(self, weight_sets: Mapping, expected: int | None) -> None:
        _settle(self.sets, weight_sets, expected)

    def score(self, gradients) -> None:
        """One batch met by every set, kept in the columns, and saved with the checkpoint when its turn comes."""
        done = _score_batch(gradients.offset, gradients.batch, gradients.captured, [self.sets[label] for label in self.labels],
                            [self.names[label] for label in self.labels], [self.tops.get(label) for label in self.labels],
                            self.per_module, self.per_token)
        _keep(done, self.labels, self.totals, self.modules)
        self.records.append(_light(done))
        checkpoint = self.plan.checkpoint
        if checkpoint is not None:
            self.unsaved.append(done)
            if len(self.records) % checkpoint.every == 0:
                checkpoint.save(len(self.records), self.unsaved, _explain_state(self.labels, self.tops) if self.tops else None)
                self.unsaved = []

    def results(self, seconds: float) -> dict[str, ScoreResult]:
        """Every set's result: the columns assembled (gathered over ranks), ids in document order."""
        plan, records = self.plan, self.records
        if not plan.splits_queries:
            records = gather_in_order([done.offset for done in records], records)  # every rank's batches, in document order
        document_ids = [doc_id for done in records for doc_id in done.ids]
        results = {}
        for position, (label, (ids, _)) in enumerate(self.sets.items()):
            rows = _token_rows(records, position, plan) if self.per_token else []
            top = self.tops.get(label)
            in_pass = top.seconds if top else 0.0  # of `seconds`; the explanations left for the end run in `finish`, after it
            explanations = top.finish() if top else None  # before the timings read `top.seconds`
            results[label] = ScoreResult(
                scores=self.totals[label].finish(), query_ids=plan.gather_queries(ids), document_ids=document_ids,
                module_names=self.names[label], per_module=self.modules[label].finish() if self.per_module else None,
                per_token=[contributions for contributions, _ in rows] if self.per_token else None,
                document_token_ids=[token_ids for _, token_ids in rows] if self.per_token else None,
                timings=_timings(seconds - in_pass, self.resumed, top),
                explanations=explanations,
            )
        return results


def _token_rows(records: list[BatchScores], position: int, plan: ScoringPlan) -> list[tuple[torch.Tensor, list[int]]]:
    """Each document's [Q, T] contributions and token ids for one set; the ranks' queries merged when they were split."""
    rows = [row for done in records for row in done.tokens[position]]
    if plan.splits_queries:
        merged = plan.gather_queries(torch.cat([c for c, _ in rows], dim=1), dim=0).split([len(i) for _, i in rows], dim=1)
        rows = list(zip(merged, [i for _, i in rows]))
    return rows


def _timings(documents_seconds: float, resumed: int, top: TopExplanations | None) -> dict:
    """The pass's seconds without the explanations', the explanations' (all of them, at the end of the pass too),
    and how many batches a resumed run did not redo."""
    spent = {} if top is None else {"explanation_seconds": top.seconds, "explanation_cpu_seconds": top.cpu_seconds}
    return {"documents_seconds": documents_seconds, "resumed_batches": resumed, **spent}


def _settle(sets: dict, weight_sets: Mapping, expected: int | None) -> None:
    """Every set's weights in their cheapest form for `expected` padded document tokens, in the caller's dicts too
    (plain tensors stay tensors): the unsettled forms are freed, not kept beside."""
    for label, (ids, weights) in sets.items():
        sets[label] = (ids, {name: w.settle(expected) for name, w in weights.items()})
        caller = weight_sets[label][1]
        caller.update({name: w for name, w in sets[label][1].items() if isinstance(caller[name], ModuleWeights)})


def _score_batch(offset: int, batch: TokenBatch, captured, sets: list[tuple[list[str], dict]], names: list[list[str]],
                 tops: list[TopExplanations | None], per_module: bool, per_token: bool) -> BatchScores:
    """One captured batch met by every set's weights: totals, and per module / per token / explanations if asked."""
    done = BatchScores(offset, list(batch.ids), [], [] if per_module else None, [] if per_token else None)
    for (ids, weights), modules, top in zip(sets, names, tops):
        total = torch.zeros(len(ids), len(batch), dtype=torch.float64, device=batch.input_ids.device)
        by_module, tokens = [], 0
        for name in modules:
            scores, contributions = weights[name].scores(captured, name, per_token)
            total += scores.double()
            if per_module or top is not None:
                by_module.append(scores.double())
            if per_token:
                tokens = tokens + contributions.double()
        done.totals.append(total.cpu())
        stacked = torch.stack(by_module).cpu() if by_module else None  # [M, Q, B]: one transfer, not one per module
        if per_module:
            done.modules.append(stacked)
        if top is not None:
            top.offer(offset, batch, captured, done.totals[-1], dict(zip(modules, stacked)), {name: weights[name] for name in modules})
        if per_token:
            keep = batch.attention_mask.bool().cpu()
            done.tokens.append([(tokens[:, row].cpu()[:, keep[row]], batch.input_ids[row].cpu()[keep[row]].tolist()) for row in range(len(batch))])
    return done


def _light(done: BatchScores) -> BatchScores:
    """What the end of the pass needs of a batch: its offset, ids and token rows."""
    return BatchScores(done.offset, done.ids, [], None, done.tokens)


def _resume(plan: ScoringPlan, labels: list[str], totals: dict, modules: dict | None, tops: dict[str, TopExplanations]) -> list[BatchScores]:
    """A resumed run's saved batches, placed in the score columns as if just scored, and the explanations' state."""
    if plan.checkpoint is None:
        return []
    finished, state, meta = plan.checkpoint.restore(explained=bool(tops))
    for done in finished:
        _keep(done, labels, totals, modules)
    for position, label in enumerate(labels):
        if label in tops and state:
            tops[label].restore({k.partition("/")[2]: v for k, v in state.items() if k.startswith(f"{position}/")}, meta[str(position)])
    return finished


def _keep(done: BatchScores, labels: list[str], totals: dict[str, ScoreColumns], modules: dict[str, ScoreColumns] | None) -> None:
    """A finished batch's blocks into the score columns of every set."""
    for position, label in enumerate(labels):
        totals[label].add(done.offset, done.totals[position])
        if modules is not None:
            modules[label].add(done.offset, done.modules[position])


def _explain_state(labels: list[str], tops: dict[str, TopExplanations]) -> tuple[dict[str, torch.Tensor], dict]:
    """Every set's running top-k explanations, keyed by the set's position, for a checkpoint."""
    tensors, meta = {}, {}
    for position, label in enumerate(labels):
        if label in tops:
            state, described = tops[label].state()
            tensors.update({f"{position}/{k}": v for k, v in state.items()})
            meta[str(position)] = described
    return tensors, meta
