"""Resume a scoring pass in the middle: this rank's finished batches, saved as it goes.

Every `every` batches the batches finished since the last save go into one new part file (safetensors: the
score blocks, and in its header the run's signature, the batches' offsets and document ids); then the state of
the running top-k explanations, if any, replaces this rank's one explanation file, stamped with the batches it
covers. A killed run started again with the same signature replays the parts (the same blocks, so the same
scores; parts newer than the explanation state, from a kill between the two writes, are scored again) and
scores only the batches after them (their documents are read again, not scored); one with another signature is
refused, on every rank. Files are written atomically, so a kill during a save leaves the previous saves intact.
Every file is sealed (the sha256 of its tensors and header, verified when read back): a damaged part, and every
part after it, is deleted and scored again, a damaged explanation state is dropped and its batches scored again,
each said in a warning, so corruption never enters the scores.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrace.errors import CorruptFile, PretraceError
from pretrace.parallel.collectives import all_gather_objects
from pretrace.parallel.group import rank
from pretrace.storage import SignedParts, fault_point


@dataclass
class BatchScores:
    """One batch's results for every weight set (by position): what the loop keeps and a checkpoint stores."""

    offset: int
    ids: list[str]
    totals: list[torch.Tensor]  # per set [Q, B]
    modules: list[torch.Tensor] | None = None  # per set [M, Q, B]
    tokens: list[list[tuple[torch.Tensor, list[int]]]] | None = None  # per set, per document ([Q, T], token ids)


@dataclass(frozen=True)
class ScoringCheckpoint:
    """Where (`folder`, shared by the ranks: one series of parts each) and how often (`every` batches) a scoring
    pass saves its finished batches; `signature` names everything the scores depend on."""

    folder: Path
    signature: str
    every: int = 50

    @property
    def _signed(self) -> SignedParts:
        return SignedParts(self.folder, self.signature, "scoring run (other models, factors, documents, queries or settings)")

    def _parts(self) -> list[str]:
        return self._signed.names(f"rank{rank():04d}-part-*")

    @property
    def _explanations(self) -> str:
        return f"rank{rank():04d}-explanations"

    def restore(self, explained: bool) -> tuple[list[BatchScores], dict[str, torch.Tensor], dict]:
        """This rank's saved batches in order, and the explanation state they come with (tensors, metadata; empty if
        none). `explained`: whether the pass keeps explanations (then only the batches their state covers count).
        Collective: a checkpoint any rank cannot use is refused on every rank."""
        try:
            restored, failure = self._restore(explained), None
        except Exception as error:  # any failure: told to every rank before it is raised, so none waits on the others
            restored, failure = ([], {}, {}), error
        problems = [p for p in all_gather_objects(None if failure is None else f"rank {rank()}: {failure}") if p is not None]
        if failure is not None:
            raise failure
        if problems:
            raise PretraceError(f"another rank cannot resume from {self.folder} ({problems[0]}).")
        return restored

    def _restore(self, explained: bool) -> tuple[list[BatchScores], dict[str, torch.Tensor], dict]:
        state: tuple[dict, dict] = ({}, {})
        covered = None
        if explained:
            covered = 0
            saved = self._signed.load(self._explanations, "the explanation state is dropped and every saved batch is scored again")
            if saved is not None:
                state, covered = (saved[0], saved[1]["explain"]), saved[1]["done"]
        batches: list[BatchScores] = []
        parts = self._parts()
        for number, name in enumerate(parts):
            try:
                tensors, meta = self._signed.read(name)
            except CorruptFile as error:
                warnings.warn(f"{error}; it and the {len(parts) - number - 1} saved part(s) after it are deleted and their batches scored again"
                              f"{' (with the explanation state, which covers them)' if covered else ''}.", stacklevel=3)
                for later in parts[number:]:
                    self._signed.path(later).unlink()
                if covered:  # the running top k holds documents of the dropped batches: every batch is scored again
                    self._signed.path(self._explanations).unlink()
                    return [], {}, {}
                break
            if covered is not None and meta["first"] + len(meta["batches"]) > covered:
                break  # saved after the explanation state (a kill between the two writes): scored again
            if meta.get("first") != len(batches):
                raise PretraceError(f"{self._signed.path(name)}: a checkpoint part is missing before it; delete {self.folder} to start over.")
            batches.extend(_batches_from(tensors, meta))
        return batches, *state

    def save(self, done: int, batches: list[BatchScores], explain: tuple[dict[str, torch.Tensor], dict] | None) -> None:
        """The batches finished since the last save (`done` in all, these included), then the explanation state."""
        tensors, meta = _batches_to(batches)
        self._signed.save(f"rank{rank():04d}-part-{done:010d}", tensors, **meta, first=done - len(batches))
        fault_point("score-checkpoint-part")
        if explain is not None:
            self._signed.save(self._explanations, explain[0], done=done, explain=explain[1])
        fault_point("score-checkpoint")


def _batches_to(batches: list[BatchScores]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, described = {}, []
    for i, batch in enumerate(batches):
        entry = {"offset": batch.offset, "ids": batch.ids, "sets": len(batch.totals)}
        for s, total in enumerate(batch.totals):
            tensors[f"{i}/{s}/total"] = total
            if batch.modules is not None:
                tensors[f"{i}/{s}/modules"] = batch.modules[s]
        if batch.tokens is not None:
            entry["token_lengths"] = [[len(ids) for _, ids in rows] for rows in batch.tokens]
            for s, rows in enumerate(batch.tokens):
                if rows:
                    tensors[f"{i}/{s}/token_scores"] = torch.cat([c for c, _ in rows], dim=1)
                    tensors[f"{i}/{s}/token_ids"] = torch.tensor([t for _, ids in rows for t in ids], dtype=torch.int64)
        described.append(entry)
    return tensors, {"batches": described}


def _batches_from(tensors: dict[str, torch.Tensor], meta: dict) -> list[BatchScores]:
    batches = []
    for i, entry in enumerate(meta["batches"]):
        sets = range(entry["sets"])
        modules = [tensors[f"{i}/{s}/modules"] for s in sets] if f"{i}/0/modules" in tensors else None
        tokens = None
        if "token_lengths" in entry:
            tokens = []
            for s, lengths in zip(sets, entry["token_lengths"]):
                if not lengths:
                    tokens.append([])
                    continue
                scores, ids = tensors[f"{i}/{s}/token_scores"].split(lengths, dim=1), tensors[f"{i}/{s}/token_ids"].split(lengths)
                tokens.append([(c.clone(), t.tolist()) for c, t in zip(scores, ids)])  # clones: a view carries its whole buffer
        batches.append(BatchScores(entry["offset"], entry["ids"], [tensors[f"{i}/{s}/total"] for s in sets], modules, tokens))
    return batches
