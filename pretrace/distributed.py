"""Scaling out over processes with torch.distributed: `torchrun --nproc-per-node N -m pretrace ...`.

Work is split by *batch*: batch i (in the data's order) goes to rank i % world. Every rank still reads
and batches the whole stream, so batches (their documents, padding and sampled-label seeds) are exactly
those of a single-process run, and results differ from it only in the order float64 sums are added.
Fitting all-reduces its running sums at the end of each pass; scoring gathers every rank's score
columns back into document order. Scoring may instead split the *queries* (`split_by("queries")`:
query q goes to rank q % world, which scores it against every document), and module-wise
preconditioners may be applied on the CPU or only on the rank owning each module (`PlacedPreconditioner`).
Fine-tuning splits every batch's sequences and all-reduces gradients (`all_reduce_gradients`).
A single process (no WORLD_SIZE > 1) never touches torch.distributed: sharding, reductions and gathers
are then the identity.

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

from pretrace.data.batching import TokenBatch
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


def resolve_device(name: str) -> torch.device:
    """A --device value as a torch device: 'auto' (and 'cuda' when available) take this process's own GPU,
    cuda:LOCAL_RANK under torchrun, or the CPU."""
    if name == "auto" or (name == "cuda" and torch.cuda.is_available()):
        return local_device()
    try:
        return torch.device(name)
    except RuntimeError:
        raise PretraceError(f"unknown --device {name!r}; use cpu, cuda, cuda:N or auto.") from None


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


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Sum each parameter's `.grad` over ranks in place, as DDP does (but summed, not averaged: each rank's
    loss is already divided by the global batch's denominator). A rank with no gradient contributes zeros."""
    if not is_active():
        return
    device = _collective_device()
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        buffer = parameter.grad if parameter.grad.device == device else parameter.grad.to(device)
        dist.all_reduce(buffer)
        if buffer is not parameter.grad:
            parameter.grad.copy_(buffer)


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


SPLITS = ("documents", "queries")
_split = "documents"


@contextmanager
def split_by(kind: str) -> Iterator[None]:
    """Inside, scoring splits `kind` over ranks: "documents" (each rank scores every query against its
    batches of documents) or "queries" (each rank scores its queries against every document: for many
    queries whose preconditioned gradients do not fit one device)."""
    global _split
    if kind not in SPLITS:
        raise PretraceError(f"cannot split scoring by {kind!r}; choose one of {list(SPLITS)}.")
    previous, _split = _split, kind
    try:
        yield
    finally:
        _split = previous


def splitting_queries() -> bool:
    return _split == "queries" and world_size() > 1


def shard_documents(items: Iterable[T]) -> Iterator[T]:
    """This rank's document batches: all of them when queries are split instead."""
    return iter(items) if splitting_queries() else shard(items)


def document_shard_size(total: int | None) -> int | None:
    return total if splitting_queries() else shard_size(total)


def shard_queries(batches: Iterable[TokenBatch]) -> Iterator[TokenBatch]:
    """When queries are split, each batch cut down to this rank's queries (the q-th query of the stream
    belongs to rank q % world); batches left empty are skipped. Otherwise the batches unchanged."""
    if not splitting_queries():
        yield from batches
        return
    first = 0
    for batch in batches:
        rows = [row for row in range(len(batch)) if (first + row) % world_size() == rank()]
        first += len(batch)
        if rows:
            yield TokenBatch([batch.ids[row] for row in rows], batch.input_ids[rows], batch.attention_mask[rows], batch.target_mask[rows])


def _query_order(sizes: list[int]) -> list[int]:
    """Where query q sits in the ranks' rows concatenated in rank order (rank r holds queries r, r + world, ...)."""
    offsets = list(itertools.accumulate([0, *sizes[:-1]]))
    return [offsets[q % len(sizes)] + q // len(sizes) for q in range(sum(sizes))]


def gather_queries(values: torch.Tensor | list, dim: int = 0) -> torch.Tensor | list:
    """When queries are split: every rank's `values` (indexed by its queries along `dim`) merged back into
    query order, on every rank. Otherwise `values` unchanged."""
    if not splitting_queries():
        return values
    parts = _all_gather(values.cpu() if isinstance(values, torch.Tensor) else list(values))
    if isinstance(values, torch.Tensor):
        order = torch.tensor(_query_order([part.shape[dim] for part in parts]))
        return torch.cat(parts, dim=dim).index_select(dim, order)
    merged = list(itertools.chain.from_iterable(parts))
    return [merged[i] for i in _query_order([len(part) for part in parts])]


def owner(position: int) -> int:
    """The rank owning the `position`-th module when work is divided by module."""
    return position % world_size()


def broadcast(tensors: list[torch.Tensor], source: int) -> list[torch.Tensor]:
    """`source`'s tensors on every rank (others pass buffers of the same shapes and dtypes)."""
    if not is_active():
        return tensors
    device, out = _collective_device(), []
    for tensor in tensors:
        buffer = tensor.to(device, memory_format=torch.contiguous_format, copy=True)  # eigh's vectors come column-major
        dist.broadcast(buffer, src=source)
        out.append(buffer.to(tensor.device))
    return out


class PlacedPreconditioner:
    """A module-wise preconditioner (EK-FAC, K-FAC, diagonal, identity and their chains) applied where its
    factors are kept: on `device` (the CPU, say, while the model runs on a GPU) instead of the gradients'
    device, and with `by_module` only on the rank that owns each module, which broadcasts the result, so a
    rank only ever moves its own modules' factors to its device. Collective when `by_module`: every rank
    must apply it to the same modules with the same shapes."""

    module_wise = True  # it only wraps module-wise operators

    def __init__(self, inner, device: torch.device | str | None = None, by_module: bool = False):
        if not inner.module_wise:
            raise PretraceError(
                f"{type(inner).__name__} couples modules, so its factors cannot be placed or sharded by module; "
                "--factors-device cpu and --shard-factors work with ekfac, kfac, diagonal and identity (single- or multi-stage)."
            )
        self.inner, self.device, self.by_module = inner, None if device is None else torch.device(device), by_module

    def apply(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for position, name in enumerate(sorted(grads)):
            grad = grads[name]
            source = owner(position) if self.by_module else rank()
            if source == rank():
                out[name] = self.inner.apply({name: grad.to(self.device or grad.device)})[name].to(grad.device)
            else:
                out[name] = torch.empty_like(grad)
            if self.by_module:
                out[name] = broadcast([out[name]], source)[0]
        return {name: out[name] for name in grads}

    def describe(self) -> dict:
        return {**self.inner.describe(), "factors_device": None if self.device is None else str(self.device), "factors_sharded_by_module": self.by_module}


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
    """Score blocks `[*lead, B]` (queries last in `lead`) placed at document offsets by any rank, assembled into `[*lead, N]`.

    In RAM (the default) each rank keeps its float64 blocks and `finish` gathers them in document order.
    Under `scores_on_disk` each block goes straight to its place in a document-major float32 file shared by
    the ranks; `finish` transposes it chunk by chunk into `<name>.npy` and returns a memory-mapped tensor.
    When queries are split, each rank holds every document for its queries (its own file on disk) and
    `finish` merges the ranks' query rows back into query order."""

    def __init__(self, name: str):
        self.offsets: list[int] = []
        self.blocks: list[torch.Tensor] = []
        self.lead: tuple[int, ...] | None = None
        self.end = 0
        self.folder = _spill_folder
        if self.folder is not None:
            self.path = self.folder / f"{name}-{next(_spill_names)}"
            self.folder.mkdir(parents=True, exist_ok=True)
            self.handle = os.open(self._columns_file(rank()), os.O_CREAT | os.O_WRONLY, 0o644)

    def _columns_file(self, of_rank: int) -> Path:
        """The document-major file a rank writes: one shared by all ranks, or one each when queries are split."""
        return self.path.with_suffix(f".rank{of_rank}.columns" if splitting_queries() else ".columns")

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
            if splitting_queries():  # every document is local: order them, then merge the ranks' queries
                return gather_queries(torch.cat(self.blocks, dim=-1), dim=-2)
            return torch.cat(gather_in_order(self.offsets, self.blocks), dim=-1)
        os.close(self.handle)
        shapes = _all_gather((self.lead, self.end))
        total = max(end for _, end in shapes)
        if splitting_queries():
            sources = [(self._columns_file(r), lead) for r, (lead, _) in enumerate(shapes)]
        else:
            sources = [(self._columns_file(0), next(lead for lead, _ in shapes if lead is not None))]
        target = self.path.with_suffix(".npy")
        if is_main():
            _transpose_to_npy(sources, target, total)
        barrier()
        return torch.from_numpy(np.load(target, mmap_mode="c"))


def _transpose_to_npy(sources: list[tuple[Path, tuple[int, ...]]], target: Path, total: int, chunk_bytes: int = 1 << 26) -> None:
    """Document-major float32 rows `[N, *lead]` -> `[*lead, N]` .npy, about `chunk_bytes` at a time. Several
    sources hold the ranks' query rows (the last axis of `lead`), merged back into query order."""
    sizes = [lead[-1] for _, lead in sources]
    lead = (*sources[0][1][:-1], sum(sizes))
    order = _query_order(sizes)
    parts = [np.memmap(path, dtype=np.float32, mode="r", shape=(total, *shape)) if size else None
             for (path, shape), size in zip(sources, sizes)]
    out = np.lib.format.open_memmap(target, mode="w+", dtype=np.float32, shape=(*lead, total))
    step = max(1, chunk_bytes // max(1, 4 * int(np.prod(lead))))
    for begin in range(0, total, step):
        blocks = [np.zeros((min(step, total - begin), *shape), np.float32) if part is None else np.asarray(part[begin:begin + step])
                  for part, (_, shape) in zip(parts, sources)]
        out[..., begin:begin + step] = np.moveaxis(np.concatenate(blocks, axis=-1)[..., order], 0, -1)
    out.flush()
    del parts, out
    for path, _ in sources:
        path.unlink(missing_ok=True)
