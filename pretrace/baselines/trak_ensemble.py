"""TRAK's ensemble, trained as the paper does: M models of the scored model's architecture, each on its own
random subset (by default half) of the training documents, counted in TRAK's one-off cost.

Member m trains with seed `seed + m` (initialisation, shuffling, dropout) on the documents of its seeded
subset, with the shared training loop (`pretrace.training.pretrain`: AdamW, warm-up then cosine, mean
loss per token). It starts from a fresh initialisation of the model's config ('scratch', the paper) or
from the model's own weights ('model', cheaper: fine-tuning on the subset). Members are saved as ordinary
model folders under one cache folder, each written atomically, so an interrupted run resumes with the
members already trained, and asking for more members later trains only the new ones. `ensemble.json`
records what the members were trained from and with; a folder recording anything else is refused.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pretrace.data.records import iter_documents
from pretrace.errors import PretraceError
from pretrace.modeling.loading import parse_dtype
from pretrace.storage import file_sha256, mark_folder, read_json, read_record, refuse_foreign, verify_folder, write_record
from pretrace.training import PRETRAIN_RECORD, TrainSettings, pretrain
from pretrace.modeling.stage import Stage

INITIALISATIONS = ("scratch", "model")
MANIFEST = "ensemble.json"
ENSEMBLE_COMMAND = "trak-ensemble"


@dataclass(frozen=True)
class EnsembleSettings:
    """How the members are trained; `members` may grow between runs that share a folder."""

    members: int
    folder: str
    data: str
    fraction: float = 0.5
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    init: str = "scratch"

    def __post_init__(self):
        checks = [
            (self.members >= 1, f"--trak-ensemble must be at least 1 to train an ensemble, got {self.members}."),
            (0 < self.fraction <= 1, f"--trak-subset-fraction must be in (0, 1], got {self.fraction}."),
            (self.init in INITIALISATIONS, f"unknown --trak-init {self.init!r}; choose one of {', '.join(INITIALISATIONS)}."),
            (Path(self.data).is_file(), f"--trak-train-data {self.data}: no such file; pass a JSONL of training documents."),
        ]
        for ok, message in checks:
            if not ok:
                raise PretraceError(message)


@dataclass
class Member:
    path: Path
    documents: int
    trained_now: bool
    train_seconds: float


def subset(count: int, fraction: float, seed: int, member: int) -> list[int]:
    """Sorted indices of member `member`'s documents: round(fraction × count) of them (at least one), seeded."""
    digest = hashlib.sha256(f"trak-subset/{seed}/{member}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    size = max(1, round(fraction * count))
    return sorted(torch.randperm(count, generator=generator)[:size].tolist())


def _signature(settings: EnsembleSettings, base: Stage) -> dict:
    recorded = {k: v for k, v in asdict(settings).items() if k not in ("members", "folder", "data")}
    return {**recorded, "data_sha256": file_sha256(settings.data), "base_fingerprint": base.fingerprint,
            "max_length": base.options.max_length, "dtype": base.options.dtype}


def _check_manifest(folder: Path, signature: dict) -> None:
    manifest = folder / MANIFEST
    if manifest.is_file():
        recorded = read_record(manifest, "delete that folder to retrain the ensemble")
        if recorded != signature:
            changed = sorted(k for k in signature.keys() | recorded.keys() if recorded.get(k) != signature.get(k))
            raise PretraceError(f"{folder} holds a TRAK ensemble trained differently ({', '.join(changed)} differ); "
                                "pass another --trak-ensemble-dir or delete that folder to retrain.")
    else:
        refuse_foreign(folder, ENSEMBLE_COMMAND, "--trak-ensemble-dir")
        folder.mkdir(parents=True, exist_ok=True)
        mark_folder(folder, ENSEMBLE_COMMAND, manifest=False)
        write_record(manifest, signature)


def _initial_model(settings: EnsembleSettings, base: Stage, member: int) -> torch.nn.Module:
    if settings.init == "model":
        return copy.deepcopy(base.model)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(settings.seed + member)
    return AutoModelForCausalLM.from_config(copy.deepcopy(base.model.config), dtype=parse_dtype(base.options.dtype))


def train_ensemble(settings: EnsembleSettings, base: Stage, progress: bool = True) -> list[Member]:
    """Train (or reuse) members 0..members-1 under `settings.folder`; returns them in order."""
    folder = Path(settings.folder)
    _check_manifest(folder, _signature(settings, base))
    documents = list(iter_documents(settings.data))
    members = []
    for m in range(settings.members):
        path = folder / f"member-{m}"
        chosen = subset(len(documents), settings.fraction, settings.seed, m)
        trained_now = not (path / PRETRAIN_RECORD).is_file()
        if trained_now:
            train = TrainSettings(lr=settings.lr, epochs=settings.epochs, batch_size=settings.batch_size,
                                  max_length=base.options.max_length, seed=settings.seed + m, device=str(base.options.torch_device()))
            started = time.perf_counter()
            pretrain(_initial_model(settings, base, m), base.tokenizer, [documents[i] for i in chosen], train,
                     out=path, dtype=base.options.dtype, progress=progress)  # saved atomically: a crash leaves no half member
            seconds = time.perf_counter() - started
        else:  # a member trained earlier: used only if its files are those it was saved with
            verify_folder(path, "pretrain", f"delete {path} to train that member again")
            seconds = float(read_json(path / PRETRAIN_RECORD).get("seconds", 0.0))
        members.append(Member(path, len(chosen), trained_now, seconds))
    return members
