"""Per-token and per-module contributions of each query's top documents, taken during the scoring pass.

Explaining the top documents after scoring means capturing their gradients a second time. Instead the scoring
loop offers every batch to `TopExplanations`: it keeps each query's running top k, and for a pair (query,
document) that enters it keeps the document's token factors, from the batch already captured (the per-module
scores are the loop's own). A pair later pushed out is dropped with them. Most pairs that ever enter a top k
are pushed out again (about k·ln(N/k) enter for N documents, k stay), so the per-token products wait: they are
computed when the pass ends, when a checkpoint saves the state, or when the held factors outgrow
`HELD_BYTES`. Ranking matches `top_indices`: higher score first, ties to the earlier document (or to the
earlier place in the query's own candidate list).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from pretrace.errors import PretraceError

from pretrace.data.batching import TokenBatch
from pretrace.gradients.capture import CapturedBatch
from pretrace.parallel.collectives import all_gather_objects
from pretrace.scores.weights import ModuleWeights

NOT_CANDIDATE = torch.iinfo(torch.int64).max
HELD_BYTES = 64 << 20  # token factors held for explanations not yet computed; beyond it they are computed at once


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
        self.waiting: dict[tuple[int, int], dict[str, float]] = {}  # pairs not yet explained: their per-module scores
        self.held: dict[int, _Held] = {}  # the token factors of the documents of waiting pairs
        self.weights: dict[str, ModuleWeights] = {}  # the weights in the basis the held factors are in
        self.seconds = self.cpu_seconds = 0.0  # spent here: what explaining adds to the pass (wall, CPU)

    def offer(self, offset: int, batch: TokenBatch, captured: CapturedBatch, scores: torch.Tensor,
              module_scores: dict[str, torch.Tensor], weights: dict[str, ModuleWeights]) -> None:
        """Documents `offset ...` of `batch`, with their `[Q, B]` scores (and per module): pairs entering the top k
        keep what their explanation needs from `captured`; pairs pushed out are dropped."""
        with self._timed():
            entering = self._rank(offset, scores)
            if len(entering[0]):  # (nothing entering: nothing pushed out either)
                self._drop_pushed_out()
                self._hold(offset, batch, captured, entering, module_scores, weights)

    def _rank(self, offset: int, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's top k with the batch's documents `offset ...` merged in; (query rows, places) of the pairs entering it."""
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
        return torch.nonzero((self.documents >= offset) & (self.keys != NOT_CANDIDATE), as_tuple=True)

    def _hold(self, offset: int, batch: TokenBatch, captured: CapturedBatch, entering: tuple[torch.Tensor, torch.Tensor],
              module_scores: dict[str, torch.Tensor], weights: dict[str, ModuleWeights]) -> None:
        """The entering pairs wait, with their per-module scores and their documents' token factors, to be explained."""
        self.weights = {name: w.own_basis() for name, w in weights.items()}
        for query_row, column in zip(*entering):
            document = int(self.documents[query_row, column])
            if document not in self.held:
                held = _Held.of(batch, captured, document - offset, weights)
                if self.held and self.held_bytes + held.bytes > HELD_BYTES:
                    self._explain_waiting()  # before holding more: at most HELD_BYTES and one document at a time
                self.held[document] = held
            self.waiting[(self.positions[int(query_row)], document)] = {name: float(s[query_row, document - offset]) for name, s in module_scores.items()}
        if self.held_bytes > HELD_BYTES:  # one document larger than the bound alone
            self._explain_waiting()

    @property
    def held_bytes(self) -> int:
        return sum(h.bytes for h in self.held.values())

    def _drop_pushed_out(self) -> None:
        """Forget the explanations, waiting pairs and held documents of pairs no longer in any top k."""
        held = set(zip((self.positions[r] for r in range(len(self.positions)) for _ in range(self.k)), self.documents.flatten().tolist()))
        self.kept = {pair: e for pair, e in self.kept.items() if pair in held}
        self.waiting = {pair: m for pair, m in self.waiting.items() if pair in held}
        still = {document for _, document in self.waiting}
        self.held = {d: h for d, h in self.held.items() if d in still}

    @contextmanager
    def _timed(self) -> Iterator[None]:
        """Count the block's wall and CPU seconds as explaining's."""
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.process_time() - cpu

    def _explain_now(self) -> None:
        with self._timed():
            self._explain_waiting()

    def _explain_waiting(self) -> None:
        """Compute every waiting pair's explanation, query by query (one product per module over the tokens of all its
        waiting documents), and let go of the held factors."""
        by_query: dict[int, list[int]] = {}
        for query, document in self.waiting:
            by_query.setdefault(query, []).append(document)
        rows = {q: row for row, q in enumerate(self.positions)}
        for query, documents in sorted(by_query.items()):
            documents.sort()
            held = [self.held[d] for d in documents]
            total = 0
            for name, w in self.weights.items():
                g = torch.cat([h.factors[name][0] for h in held])
                a = torch.cat([h.factors[name][1] for h in held])
                total = total + w.token_scores(g, a, [rows[query]])[0].double()
            parts = total.cpu().split([len(h.token_ids) for h in held])
            for document, h, part in zip(documents, held, parts):  # clones: a view would carry (and gather) every part
                self.kept[(query, document)] = Explanation(h.token_ids, part.clone(), self.waiting[(query, document)])
        self.waiting, self.held = {}, {}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything needed to carry on after a restart (tensors, and JSON metadata), for a checkpoint. Waiting pairs
        are explained first, at the same batch whether or not the run is later resumed: the same values either way."""
        self._explain_now()
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
        self._explain_now()
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


@dataclass
class _Held:
    """One document's real tokens and, per module, their token factors (output gradients, inputs) in the basis its
    query weights are kept in, rotated once however many queries hold it."""

    token_ids: list[int]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    bytes: int

    @classmethod
    def of(cls, batch: TokenBatch, captured: CapturedBatch, row: int, weights: dict[str, ModuleWeights]) -> "_Held":
        """Copies, not views: a view would keep the whole batch's captured tensors alive."""
        keep = batch.attention_mask[row].bool()
        factors = {name: w.in_own_basis(captured.output_gradients[name][row, keep], captured.activations[name][row, keep])[1:]
                   for name, w in weights.items()}
        size = sum(g.nbytes + a.nbytes for g, a in factors.values())
        return cls(batch.input_ids[row, keep].tolist(), factors, size)

