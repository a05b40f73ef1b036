"""Resume a scoring pass in the middle: this rank's finished batches, saved as it goes.

Every `every` batches the batches finished since the last save go into one new part file (safetensors: the
score blocks, and in its header the run's signature, the batches' offsets and document ids), with the state of
the running top-k explanations. A killed run started again with the same signature replays the parts (the same
blocks, so the same scores) and scores only the batches after them; one with another signature is refused.
Parts are written atomically, so a kill during a save leaves the previous saves intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrace.errors import PretraceError
from pretrace.parallel.group import rank
from pretrace.storage import fault_point, read_tensor_metadata, read_tensors, write_tensors

KEY = "pretrace_scoring_checkpoint"


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

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob(f"rank{rank():04d}-*.safetensors")) if self.folder.is_dir() else []

    def restore(self) -> tuple[list[BatchScores], dict[str, torch.Tensor], dict]:
        """This rank's saved batches in order, and the latest explanation state (tensors, metadata; empty if none)."""
        batches: list[BatchScores] = []
        state: tuple[dict, dict] = ({}, {})
        for path in self._parts():
            try:
                meta = json.loads(read_tensor_metadata(path)[KEY])
            except (KeyError, ValueError):
                raise PretraceError(f"{path}: not a scoring checkpoint of this pretrace version; delete {self.folder} to start over.") from None
            if meta.get("signature") != self.signature:
                raise PretraceError(f"{self.folder}: holds a checkpoint of a different scoring run (other models, factors, documents, "
                                    "queries or settings); delete that folder to start over, or rerun with the settings it was made with.")
            if meta.get("first") != len(batches):
                raise PretraceError(f"{path}: a checkpoint part is missing before it; delete {self.folder} to start over.")
            tensors = read_tensors(path)
            batches.extend(_batches_from(tensors, meta))
            state = ({k.removeprefix("explain/"): v for k, v in tensors.items() if k.startswith("explain/")}, meta.get("explain", {}))
        return batches, *state

    def save(self, done: int, batches: list[BatchScores], explain: tuple[dict[str, torch.Tensor], dict]) -> None:
        """The batches finished since the last save (`done` in all, this one included) and the explanation state."""
        tensors, meta = _batches_to(batches)
        tensors.update({f"explain/{k}": v for k, v in explain[0].items()})
        meta.update(signature=self.signature, first=done - len(batches), explain=explain[1])
        write_tensors(self.folder / f"rank{rank():04d}-{done:010d}.safetensors", tensors, metadata={KEY: json.dumps(meta)})
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
                tokens.append([(c, t.tolist()) for c, t in zip(scores, ids)])
        batches.append(BatchScores(entry["offset"], entry["ids"], [tensors[f"{i}/{s}/total"] for s in sets], modules, tokens))
    return batches
