"""Scaling out over processes with torch.distributed: `torchrun --nproc-per-node N -m pretrace ...`.

Work is split by *batch*: batch i (in the data's order) goes to rank i % world. Every rank still reads
and batches the whole stream, so batches (their documents, padding and sampled-label seeds) are exactly
those of a single-process run, and results differ from it only in the order float64 sums are added.
Fitting all-reduces its running sums at the end of each pass; scoring gathers every rank's score
columns back into document order. A single process (no WORLD_SIZE > 1) never touches torch.distributed:
sharding, reductions and gathers are then the identity.

Only rank 0 writes folders and shows output: `initialize` silences stdout and warnings on other ranks.
A rank that fails exits non-zero, and torchrun then stops the others instead of leaving them waiting.
"""

from __future__ import annotations

import atexit
import itertools
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from pretrace.errors import PretraceError

T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise PretraceError(f"environment variable {name}={value!r} is not an integer; launch with torchrun, which sets it.") from None


def requested_world_size() -> int:
    """Processes asked for by the launcher (torchrun sets WORLD_SIZE); 1 when launched plainly."""
    return _env_int("WORLD_SIZE", 1)


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def is_main() -> bool:
    return rank() == 0


def local_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available (one GPU per process), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", _env_int("LOCAL_RANK", 0) % torch.cuda.device_count())


def initialize() -> None:
    """Join the process group described by torchrun's environment (idempotent; nothing when WORLD_SIZE <= 1).

    The backend is NCCL when CUDA is available, else gloo."""
    if is_active() or requested_world_size() <= 1:
        return
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise PretraceError(f"WORLD_SIZE > 1 but {', '.join(missing)} unset; launch with `torchrun --nproc-per-node N -m pretrace ...`.")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend=backend, init_method="env://")
    atexit.register(_shutdown)
    if not is_main():
        from transformers.utils import logging as transformers_logging

        sys.stdout = open(os.devnull, "w")
        warnings.simplefilter("ignore")
        transformers_logging.disable_progress_bar()


def _shutdown() -> None:
    if is_active():
        dist.destroy_process_group()


def barrier() -> None:
    if is_active():
        dist.barrier(device_ids=[local_device().index] if dist.get_backend() == "nccl" else None)


def shard(items: Iterable[T]) -> Iterator[T]:
    """This rank's items: every world_size-th, starting at its rank."""
    return itertools.islice(items, rank(), None, world_size())


def shard_size(total: int | None) -> int | None:
    """How many of `total` items `shard` gives this rank."""
    return None if total is None else len(range(rank(), total, world_size()))


def per_rank_name(name: str) -> str:
    """A file stem private to this rank (unchanged in a single process), for per-rank checkpoints."""
    return name if world_size() == 1 else f"{name}.rank{rank()}-of-{world_size()}"


def _collective_device() -> torch.device:
    return local_device() if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sums(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor over ranks (a new dict; inputs untouched, so checkpoints keep this rank's share).

    Tensors are reduced in name order: a dict restored from a checkpoint is ordered differently from a fresh one."""
    if not is_active():
        return tensors
    device = _collective_device()
    reduced = {}
    for name in sorted(tensors):
        buffer = tensors[name].to(device, copy=True)
        dist.all_reduce(buffer)
        reduced[name] = buffer.to(tensors[name].device)
    return {name: reduced[name] for name in tensors}


def all_reduce_counts(counts: dict[str, int]) -> dict[str, int]:
    """Sum integer counters over ranks."""
    if not is_active():
        return dict(counts)
    names = sorted(counts)
    buffer = torch.tensor([int(counts[n]) for n in names], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(buffer)
    return dict(zip(names, buffer.tolist()))


def gather_in_order(keys: list[int], values: list[T]) -> list[T]:
    """Every rank's `values` (picklable, tensors on CPU), merged over ranks and sorted by their `keys`.

    Each rank gets the full list, so whatever follows (top-k, explanations) runs identically everywhere."""
    if len(keys) != len(values):
        raise ValueError("gather_in_order needs one key per value")
    merged = sorted(itertools.chain.from_iterable(_all_gather(list(zip(keys, values)))), key=lambda kv: kv[0])
    return [v for _, v in merged]


def _all_gather(obj: T) -> list[T]:
    """One picklable object from each rank, in rank order."""
    if not is_active():
        return [obj]
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts


def with_offsets(batches: Iterable) -> Iterator[tuple[int, object]]:
    """(position of the batch's first document in the stream, batch), computed before sharding."""
    offset = 0
    for batch in batches:
        yield offset, batch
        offset += len(batch)


_spill_folder: Path | None = None
_spill_names = itertools.count()


@contextmanager
def scores_on_disk(folder: str | Path | None) -> Iterator[None]:
    """Inside, `ScoreColumns` stream to float32 memory-mapped files in `folder` (a folder every rank can
    reach) instead of RAM: the `[Q, N]` scores then live in the page cache, shared by the ranks, not in
    each process's memory."""
    global _spill_folder
    previous, _spill_folder = _spill_folder, (Path(folder) if folder is not None else None)
    try:
        yield
    finally:
        _spill_folder = previous


class ScoreColumns:
    """Score blocks `[*lead, B]` placed at document offsets by any rank, assembled into `[*lead, N]`.

    In RAM (the default) each rank keeps its float64 blocks and `finish` gathers them in document order.
    Under `scores_on_disk` each block goes straight to its place in a document-major float32 file shared by
    the ranks; `finish` transposes it chunk by chunk into `<name>.npy` and returns a memory-mapped tensor."""

    def __init__(self, name: str):
        self.offsets: list[int] = []
        self.blocks: list[torch.Tensor] = []
        self.lead: tuple[int, ...] | None = None
        self.end = 0
        self.folder = _spill_folder
        if self.folder is not None:
            self.path = self.folder / f"{name}-{next(_spill_names)}"
            self.folder.mkdir(parents=True, exist_ok=True)
            self.handle = os.open(self.path.with_suffix(".columns"), os.O_CREAT | os.O_WRONLY, 0o644)

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
            return torch.cat(gather_in_order(self.offsets, self.blocks), dim=-1)
        os.close(self.handle)
        shapes = _all_gather((self.lead, self.end))
        lead = next(shape for shape, _ in shapes if shape is not None)
        total = max(end for _, end in shapes)
        target = self.path.with_suffix(".npy")
        if is_main():
            _transpose_to_npy(self.path.with_suffix(".columns"), target, lead, total)
        barrier()
        return torch.from_numpy(np.load(target, mmap_mode="c"))


def _transpose_to_npy(source: Path, target: Path, lead: tuple[int, ...], total: int, chunk_bytes: int = 1 << 26) -> None:
    """Document-major float32 rows `[N, *lead]` -> `[*lead, N]` .npy, about `chunk_bytes` at a time."""
    rows = np.memmap(source, dtype=np.float32, mode="r", shape=(total, *lead))
    out = np.lib.format.open_memmap(target, mode="w+", dtype=np.float32, shape=(*lead, total))
    step = max(1, chunk_bytes // max(1, rows[0].nbytes))
    for begin in range(0, total, step):
        out[..., begin:begin + step] = np.moveaxis(np.asarray(rows[begin:begin + step]), 0, -1)
    out.flush()
    del rows, out
    source.unlink()
