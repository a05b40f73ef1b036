"""The process group: joining it from torchrun's environment, this process's rank and device, barriers."""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist

from pretrace.errors import PretraceError


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


def local_world_size() -> int:
    """Processes on this machine, which share its memory (torchrun sets LOCAL_WORLD_SIZE); 1 when launched plainly."""
    return _env_int("LOCAL_WORLD_SIZE", 1)


def is_active() -> bool:
    """Whether this process has joined a process group (never in a plain single-process run)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def is_main() -> bool:
    """Rank 0: the one that writes folders and shows output."""
    return rank() == 0


def local_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available (one GPU per process), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", _env_int("LOCAL_RANK", 0) % torch.cuda.device_count())


def resolve_device(name: str) -> torch.device:
    """A --device value as a torch device: 'auto' (and 'cuda' when available) take this process's own GPU,
    cuda:LOCAL_RANK under torchrun, or the CPU."""
    check_device(name)
    if name == "auto" or (name == "cuda" and torch.cuda.is_available()):
        return local_device()
    return torch.device(name)


def check_device(name: str) -> None:
    """Refuse, before any model is loaded, a --device this machine cannot run on: not a device, a CUDA device it lacks,
    or a kind pretrace does not run on (torch would otherwise fail deep inside loading or copying)."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise PretraceError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto.") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise PretraceError(f"--device {name}: pretrace runs models on cpu or cuda devices, not {device.type}; use cpu, cuda, cuda:N or auto.")
    if not torch.cuda.is_available():
        raise PretraceError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); pass --device cpu or auto.")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise PretraceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0 to "
                            f"cuda:{torch.cuda.device_count() - 1}); pass one of them.")


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


def _shutdown() -> None:
    if is_active():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if is_active():
        dist.barrier(device_ids=[local_device().index] if dist.get_backend() == "nccl" else None)


def per_rank_name(name: str) -> str:
    """A file stem private to this rank (unchanged in a single process), for per-rank checkpoints."""
    return name if world_size() == 1 else f"{name}.rank{rank()}-of-{world_size()}"
