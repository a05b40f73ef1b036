"""Sums, gathers and broadcasts over ranks, and which rank takes which item (the identity in one process)."""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

from pretrace.parallel.group import is_active, local_device, rank, world_size

T = TypeVar("T")


def shard(items: Iterable[T]) -> Iterator[T]:
    """This rank's items: every world_size-th, starting at its rank."""
    return itertools.islice(items, rank(), None, world_size())


def shard_size(total: int | None) -> int | None:
    """How many of `total` items `shard` gives this rank."""
    return None if total is None else len(range(rank(), total, world_size()))


def with_offsets(batches: Iterable) -> Iterator[tuple[int, object]]:
    """(position of the batch's first document in the stream, batch), computed before sharding."""
    offset = 0
    for batch in batches:
        yield offset, batch
        offset += len(batch)


def owner(position: int) -> int:
    """The rank owning the `position`-th module when work is divided by module."""
    return position % world_size()


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


def all_gather_objects(obj: T) -> list[T]:
    """One picklable object (tensors on the CPU) from each rank, in rank order, on every rank."""
    if not is_active():
        return [obj]
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts


def gather_in_order(keys: list[int], values: list[T]) -> list[T]:
    """Every rank's `values` (picklable, tensors on CPU), merged over ranks and sorted by their `keys`.

    Each rank gets the full list, so whatever follows (top-k, explanations) runs identically everywhere."""
    if len(keys) != len(values):
        raise ValueError("gather_in_order needs one key per value")
    merged = sorted(itertools.chain.from_iterable(all_gather_objects(list(zip(keys, values)))), key=lambda kv: kv[0])
    return [v for _, v in merged]


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
