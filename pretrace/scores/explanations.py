"""Per-token and per-module contributions of each query's top documents, taken during the scoring pass.

Explaining the top documents after scoring means capturing their gradients a second time. Instead the scoring
loop offers every batch to `TopExplanations`: it keeps each query's running top k, and only for a pair
(query, document) that enters it computes the per-token contributions, from the batch already captured (the
per-module scores are the loop's own). A pair later pushed out is dropped. Ranking matches `top_indices`:
higher score first, ties to the earlier document (or to the earlier place in the query's own candidate list).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pretrace.errors import PretraceError

from pretrace.data.batching import TokenBatch
from pretrace.gradients.capture import CapturedBatch
from pretrace.parallel.collectives import all_gather_objects
from pretrace.scores.weights import ModuleWeights

NOT_CANDIDATE = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class Explain:
    """Which pairs to explain: each query's `k` best documents, among all documents or, with `among`, among its
    own candidates (per query, document indices in the order that breaks ties)."""

    k: int
    among: list[list[int]] | None = None

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise PretraceError(f"Explain.k must be an integer of at least 1 (the documents explained per query), got {self.k!r}.")


@dataclass
class Explanation:
    """Why one document scores what it does for one query: its kept tokens' ids and contributions and each module's
    part of the score (each sums to the score, up to rounding: they are computed by different contractions)."""

    token_ids: list[int]
    token_scores: torch.Tensor  # [T] float64
    module_scores: dict[str, float]


class TopExplanations:
    """The running top `explain.k` of this rank's queries (global positions `positions`) over the documents it
    scores, with the explanations of the pairs in it."""

    def __init__(self, explain: Explain, positions: list[int]):
        self.k, self.positions = explain.k, positions
        self.values = torch.full((len(positions), explain.k), -torch.inf, dtype=torch.float64)
        self.keys = torch.full((len(positions), explain.k), NOT_CANDIDATE, dtype=torch.int64)  # tie-break keys
        self.documents = torch.full((len(positions), explain.k), -1, dtype=torch.int64)
        # with `among`: every (document, query row, place in that query's candidates), sorted by document
        self.candidates: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if explain.among is not None:
            first_place = {(row, d): place for row, q in enumerate(positions) for place, d in reversed(list(enumerate(explain.among[q])))}
            triples = torch.tensor([(d, row, place) for (row, d), place in first_place.items()], dtype=torch.int64).reshape(-1, 3)
            triples = triples[triples[:, 0].argsort(stable=True)]
            self.candidates = (triples[:, 0].contiguous(), triples[:, 1].contiguous(), triples[:, 2].contiguous())
        self.kept: dict[tuple[int, int], Explanation] = {}
        self.seconds = self.cpu_seconds = 0.0  # spent here: what explaining adds to the pass (wall, CPU)

    def offer(self, offset: int, batch: TokenBatch, captured: CapturedBatch, scores: torch.Tensor,
              module_scores: dict[str, torch.Tensor], weights: dict[str, ModuleWeights]) -> None:
        """Documents `offset ...` of `batch`, with their `[Q, B]` scores (and per module): pairs entering the top k
        get their explanation from `captured`; pairs pushed out are dropped."""
        start, cpu = time.perf_counter(), time.process_time()
        width = scores.shape[1]
        columns = torch.arange(offset, offset + width)
        if self.candidates is None:
            keys = columns.expand(len(self.positions), width)
        else:  # the candidates among these documents, found by binary search; the rest are no query's
            documents, rows, places = self.candidates
            first, last = torch.searchsorted(documents, torch.tensor([offset, offset + width])).tolist()
            keys = torch.full((len(self.positions), width), NOT_CANDIDATE, dtype=torch.int64)
            keys[rows[first:last], documents[first:last] - offset] = places[first:last]
        values = torch.where(keys == NOT_CANDIDATE, -torch.inf, scores.double().cpu())
        self.values, self.keys, self.documents = _best(
            torch.cat([self.values, values], 1), torch.cat([self.keys, keys], 1),
            torch.cat([self.documents, columns.expand(len(self.positions), width)], 1), self.k)
        entering: dict[int, list[int]] = {}  # query row -> the batch rows entering its top k
        for query_row, column in zip(*torch.nonzero((self.documents >= offset) & (self.keys != NOT_CANDIDATE), as_tuple=True)):
            entering.setdefault(int(query_row), []).append(int(self.documents[query_row, column]) - offset)
        if entering:  # (nothing entering: nothing pushed out either)
            for (query_row, row), explanation in _explain(batch, captured, entering, module_scores, weights).items():
                self.kept[(self.positions[query_row], offset + row)] = explanation
            held = set(zip((self.positions[r] for r in range(len(self.positions)) for _ in range(self.k)), self.documents.flatten().tolist()))
            self.kept = {pair: e for pair, e in self.kept.items() if pair in held}
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything needed to carry on after a restart (tensors, and JSON metadata), for a checkpoint."""
        pairs = list(self.kept)
        kept = [self.kept[pair] for pair in pairs]
        modules = list(kept[0].module_scores) if kept else []
        tensors = {"values": self.values, "keys": self.keys, "documents": self.documents,
                   "pairs": torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2),
                   "token_scores": torch.cat([e.token_scores for e in kept]) if kept else torch.zeros(0, dtype=torch.float64),
                   "token_ids": torch.tensor([t for e in kept for t in e.token_ids], dtype=torch.int64),
                   "module_scores": torch.tensor([list(e.module_scores.values()) for e in kept], dtype=torch.float64).reshape(len(kept), len(modules))}
        return tensors, {"token_lengths": [len(e.token_ids) for e in kept], "modules": modules}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Carry on from `state()`'s output."""
        self.values, self.keys, self.documents = tensors["values"], tensors["keys"], tensors["documents"]
        lengths = meta["token_lengths"]
        scores, ids = tensors["token_scores"].split(lengths), tensors["token_ids"].split(lengths)
        # clones, not views of one buffer: a view would carry (and gather across ranks) the whole buffer
        self.kept = {(int(q), int(d)): Explanation(t.tolist(), c.clone(), dict(zip(meta["modules"], m.tolist())))
                     for (q, d), c, t, m in zip(tensors["pairs"].tolist(), scores, ids, tensors["module_scores"])}

    def finish(self) -> dict[tuple[int, int], Explanation]:
        """Every rank's kept explanations, by (query position, document index): a superset of the final top k."""
        merged: dict[tuple[int, int], Explanation] = {}
        for part in all_gather_objects(self.kept):
            merged.update(part)
        return merged


def _best(values: torch.Tensor, keys: torch.Tensor, documents: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row the `k` highest values, ties to the smaller key (two stable sorts: by key, then by value)."""
    by_key = keys.argsort(dim=1, stable=True)
    by_value = values.gather(1, by_key).argsort(dim=1, descending=True, stable=True)
    chosen = by_key.gather(1, by_value)[:, :k]
    return values.gather(1, chosen), keys.gather(1, chosen), documents.gather(1, chosen)


def _explain(batch: TokenBatch, captured: CapturedBatch, entering: dict[int, list[int]], module_scores: dict[str, torch.Tensor],
             weights: dict[str, ModuleWeights]) -> dict[tuple[int, int], Explanation]:
    """Explanations of the pairs (query row, batch row) entering: each document's kept (non-padding) tokens only, and
    per module one `[tokens, d_out] × [d_out, d_in']` product per query over the tokens of its entering documents
    (no other pair is computed)."""
    entering = {q: sorted(chosen) for q, chosen in entering.items()}
    rows = sorted({row for chosen in entering.values() for row in chosen})
    keep = batch.attention_mask[rows].bool()
    kept_rows, kept_positions = keep.nonzero(as_tuple=True)  # the entering rows' real tokens, row by row
    kept_rows = torch.tensor(rows, device=keep.device)[kept_rows]  # one gather per module instead of two copies
    lengths = keep.sum(1).tolist()
    starts = [sum(lengths[:i]) for i in range(len(rows))]
    place = {row: i for i, row in enumerate(rows)}
    spans = {q: None if len(chosen) == len(rows) else torch.cat([torch.arange(starts[place[r]], starts[place[r]] + lengths[place[r]]) for r in chosen])
             for q, chosen in entering.items()}
    every = [q for q, span in spans.items() if span is None]  # queries for which every entering row enters: one product
    tokens = {q: 0 for q in entering}
    for name, w in weights.items():
        # [tokens, d] of the entering rows only, rotated once if the weights are kept in an eigenbasis
        w, g, a = w.in_own_basis(captured.output_gradients[name][kept_rows, kept_positions], captured.activations[name][kept_rows, kept_positions])
        if every:
            for q, values in zip(every, w.token_scores(g, a, every)):
                tokens[q] = tokens[q] + values.double()
        for q, span in spans.items():
            if span is not None:
                tokens[q] = tokens[q] + w.token_scores(g[span.to(g.device)], a[span.to(a.device)], [q])[0].double()
    token_ids = batch.input_ids[kept_rows, kept_positions].cpu().split(lengths)
    explained = {}
    for q, chosen in entering.items():
        parts = tokens[q].cpu().split([lengths[place[r]] for r in chosen])
        for row, part in zip(chosen, parts):  # clones: a view would keep (and gather across ranks) the whole buffer
            explained[(q, row)] = Explanation(token_ids[place[row]].tolist(), part.clone(), {name: float(s[q, row]) for name, s in module_scores.items()})
    return explained
