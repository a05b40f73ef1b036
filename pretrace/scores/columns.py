"""Score columns `[*lead, N]` assembled from blocks that any rank places at document offsets, in RAM or on disk."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import torch

from pretrace.parallel.collectives import all_gather_objects, gather_in_order
from pretrace.parallel.group import barrier, is_main, rank
from pretrace.scores.plan import ScoringPlan, query_order
from pretrace.storage import allocate


class ScoreColumns:
    """Score blocks `[*lead, B]` (queries last in `lead`) placed at document offsets by any rank, assembled into `[*lead, N]`.

    In RAM (no `plan.spill_folder`) each rank keeps its float64 blocks and `finish` gathers them in document
    order. With a spill folder each block goes straight to its place in a document-major float32 file shared
    by the ranks, so the `[Q, N]` scores live in the page cache, shared by the ranks, not in each process's
    memory; `finish` transposes it chunk by chunk into `<name>-<id>.npy` and returns a memory-mapped tensor.
    When queries are split, each rank holds every document for its queries (its own file on disk) and
    `finish` merges the ranks' query rows back into query order. Made on every rank at the same point
    (collective on disk: rank 0 picks the file name)."""

    def __init__(self, name: str, plan: ScoringPlan):
        self.plan = plan
        self.offsets: list[int] = []
        self.blocks: list[torch.Tensor] = []
        self.lead: tuple[int, ...] | None = None
        self.end = 0
        self.folder = plan.spill_folder
        if self.folder is not None:
            unique = all_gather_objects(uuid.uuid4().hex[:12])[0]  # rank 0's: every rank must name the same file
            self.path = self.folder / f"{name}-{unique}"
            self.folder.mkdir(parents=True, exist_ok=True)
            self.handle = os.open(self._columns_file(rank()), os.O_CREAT | os.O_WRONLY, 0o644)

    def _columns_file(self, of_rank: int) -> Path:
        """The document-major file a rank writes: one shared by all ranks, or one each when queries are split."""
        return self.path.with_name(self.path.name + (f".rank{of_rank}.columns" if self.plan.splits_queries else ".columns"))

    def add(self, offset: int, block: torch.Tensor) -> None:
        self.lead, self.end = tuple(block.shape[:-1]), max(self.end, offset + block.shape[-1])
        if self.folder is None:
            self.offsets.append(offset)
            self.blocks.append(block)
            return
        rows = block.movedim(-1, 0).contiguous().to(torch.float32).numpy()
        os.pwrite(self.handle, rows.tobytes(), offset * rows[0].nbytes)

    def finish(self) -> torch.Tensor:
        """The `[*lead, N]` tensor, on every rank (collective when distributed)."""
        if self.folder is None:
            if self.plan.splits_queries:  # every document is local: order them, then merge the ranks' queries
                return self.plan.gather_queries(torch.cat(self.blocks, dim=-1), dim=-2)
            return torch.cat(gather_in_order(self.offsets, self.blocks), dim=-1)
        os.close(self.handle)
        shapes = all_gather_objects((self.lead, self.end))
        total = max(end for _, end in shapes)
        if self.plan.splits_queries:
            sources = [(self._columns_file(r), lead) for r, (lead, _) in enumerate(shapes)]
        else:
            sources = [(self._columns_file(0), next(lead for lead, _ in shapes if lead is not None))]
        target = self.path.with_name(self.path.name + ".npy")  # appended: a name may hold dots of its own
        if is_main():
            transpose_to_npy(sources, target, total)
        barrier()
        return torch.from_numpy(np.load(target, mmap_mode="c"))


def transpose_to_npy(sources: list[tuple[Path, tuple[int, ...]]], target: Path, total: int, chunk_bytes: int = 1 << 26) -> None:
    """Document-major float32 rows `[N, *lead]` -> `[*lead, N]` .npy, about `chunk_bytes` at a time. Several
    sources hold the ranks' query rows (the last axis of `lead`), merged back into query order; sources are deleted."""
    sizes = [lead[-1] for _, lead in sources]
    lead = (*sources[0][1][:-1], sum(sizes))
    order = query_order(sizes)
    parts = [np.memmap(path, dtype=np.float32, mode="r", shape=(total, *shape)) if size else None
             for (path, shape), size in zip(sources, sizes)]
    out = np.lib.format.open_memmap(target, mode="w+", dtype=np.float32, shape=(*lead, total))
    allocate(target)
    step = max(1, chunk_bytes // max(1, 4 * int(np.prod(lead))))
    for begin in range(0, total, step):
        blocks = [np.zeros((min(step, total - begin), *shape), np.float32) if part is None else np.asarray(part[begin:begin + step])
                  for part, (_, shape) in zip(parts, sources)]
        out[..., begin:begin + step] = np.moveaxis(np.concatenate(blocks, axis=-1)[..., order], 0, -1)
    out.flush()
    del parts, out
    for path, _ in sources:
        path.unlink(missing_ok=True)
