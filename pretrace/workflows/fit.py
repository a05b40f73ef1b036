"""`pretrace fit`: EK-FAC factors of a model on a JSONL corpus, written atomically, resumable."""

from __future__ import annotations

import shutil
from pathlib import Path

from pretrace import distributed
from pretrace.config import to_dict
from pretrace.curvature import FitSettings, Factors, fit_factors
from pretrace.errors import PretraceError
from pretrace.modeling.modules import require_linear_modules
from pretrace.storage import atomic_directory, file_sha256
from pretrace.workflows.common import ModelOptions, load_stage


def checkpoint_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.checkpoint"


def fit(model: str | Path, data: str | Path, out: str | Path, options: ModelOptions | None = None,
        settings: FitSettings | None = None, overwrite: bool = False, progress: bool = True) -> Factors:
    """Fit factors of the model folder `model` on the documents in `data` and save them to `out`."""
    distributed.initialize()
    options, settings = options or ModelOptions(), settings or FitSettings()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PretraceError(f"{out}: already exists and is not empty; pass --overwrite or choose another --out.")
    stage = load_stage(model, options)
    require_linear_modules(stage.tracked, "pretrace fit")
    data_hash = file_sha256(data) if Path(data).is_file() else None
    if data_hash is None:
        raise PretraceError(f"{data}: no such file; pass a JSONL file with one {{\"text\": ...}} object per line.")
    signature = {"model_fingerprint": stage.fingerprint, "data_sha256": data_hash, "options": to_dict(options)}
    checkpoint = checkpoint_folder(out)
    factors = fit_factors(
        stage.model, stage.tracked, stage.fitting_batches(data), settings,
        num_batches=stage.document_batch_count(data), checkpoint_dir=checkpoint, signature=signature, progress=progress,
    )
    factors.metadata.update({
        "model": str(Path(model).resolve()),
        "model_fingerprint": stage.fingerprint,
        "model_type": getattr(stage.model.config, "model_type", None),
        "data": str(Path(data).resolve()),
        "data_sha256": data_hash,
        "options": to_dict(options),
    })
    if distributed.is_main():
        with atomic_directory(out, overwrite=True) as tmp:
            factors.save(tmp)
        shutil.rmtree(checkpoint, ignore_errors=True)
    distributed.barrier()
    return factors
