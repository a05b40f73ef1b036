"""How one scoring run is laid out over ranks and memory: an explicit value handed down, never a global.

Under torchrun the ranks split either the *documents* (each rank scores every query against its batches
of documents; the default) or the *queries* (query q goes to rank q % world, which scores it against every
document: for many queries whose preconditioned gradients do not fit one device). Scores either stay in
RAM or, with a spill folder, stream into float32 memory-mapped files there (`ScoreColumns`); with a checkpoint the
pass can be resumed in the middle (`ScoringCheckpoint`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

import torch

from pretrace.data.batching import TokenBatch
from pretrace.errors import PretraceError
from pretrace.parallel.collectives import all_gather_objects, shard, shard_size
from pretrace.parallel.group import rank, world_size
from pretrace.scores.checkpoint import ScoringCheckpoint
from pretrace.settings.scores import SPLITS

T = TypeVar("T")


@dataclass(frozen=True)
class ScoringPlan:
    """`split`: what the ranks divide ("documents" or "queries"); `spill_folder`: where score columns stream
    to disk (a folder every rank can reach), None to keep them in RAM; `checkpoint`: where and how often the
    pass saves its finished batches to resume from (None: it does not)."""

    split: str = "documents"
    spill_folder: Path | None = None
    checkpoint: ScoringCheckpoint | None = None

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise PretraceError(f"cannot split scoring by {self.split!r}; choose one of {list(SPLITS)}.")
        if self.spill_folder is not None:
            object.__setattr__(self, "spill_folder", Path(self.spill_folder))

    @property
    def splits_queries(self) -> bool:
        """Whether queries, not documents, are divided over ranks (never in a single process)."""
        return self.split == "queries" and world_size() > 1

    def shard_documents(self, items: Iterable[T]) -> Iterator[T]:
        """This rank's document batches: all of them when queries are split instead."""
        return iter(items) if self.splits_queries else shard(items)

    def document_shard_size(self, total: int | None) -> int | None:
        return total if self.splits_queries else shard_size(total)

    def shard_queries(self, batches: Iterable[TokenBatch]) -> Iterator[TokenBatch]:
        """When queries are split, each batch cut down to this rank's queries (the q-th query of the stream
        belongs to rank q % world); batches left empty are skipped. Otherwise the batches unchanged."""
        if not self.splits_queries:
            yield from batches
            return
        first = 0
        for batch in batches:
            rows = [row for row in range(len(batch)) if (first + row) % world_size() == rank()]
            first += len(batch)
            if rows:
                yield TokenBatch([batch.ids[row] for row in rows], batch.input_ids[rows], batch.attention_mask[rows], batch.target_mask[rows])

    def query_positions(self, count: int) -> list[int]:
        """Where this rank's `count` queries sit among all queries (rank r holds r, r + world, ... when queries are split)."""
        if not self.splits_queries:
            return list(range(count))
        return [rank() + i * world_size() for i in range(count)]

    def gather_queries(self, values: torch.Tensor | list, dim: int = 0) -> torch.Tensor | list:
        """When queries are split: every rank's `values` (indexed by its queries along `dim`) merged back into
        query order, on every rank. Otherwise `values` unchanged."""
        if not self.splits_queries:
            return values
        parts = all_gather_objects(values.cpu() if isinstance(values, torch.Tensor) else list(values))
        if isinstance(values, torch.Tensor):
            order = torch.tensor(query_order([part.shape[dim] for part in parts]))
            return torch.cat(parts, dim=dim).index_select(dim, order)
        merged = list(itertools.chain.from_iterable(parts))
        return [merged[i] for i in query_order([len(part) for part in parts])]


def query_order(sizes: list[int]) -> list[int]:
    """Where query q sits in the ranks' rows concatenated in rank order (rank r holds queries r, r + world, ...)."""
    offsets = list(itertools.accumulate([0, *sizes[:-1]]))
    return [offsets[q % len(sizes)] + q // len(sizes) for q in range(sum(sizes))]
