"""`pretrace fit`: EK-FAC factors of a model on a JSONL corpus, written atomically, resumable."""

from __future__ import annotations

from pathlib import Path

from pretrace.parallel import group
from pretrace.config import require_instance, require_path, to_dict
from pretrace.curvature import FitSettings, Factors, fit_factors
from pretrace.modeling.adapters import model_folders
from pretrace.modeling.modules import require_linear_modules
from pretrace.data.records import check_source, source_sha256
from pretrace.storage import checkpoint_folder, output_folder
from pretrace.modeling.stage import ModelOptions, load_stage


def fit(model: str | Path, data: str | Path, out: str | Path, options: ModelOptions | None = None,
        settings: FitSettings | None = None, overwrite: bool = False, progress: bool = True) -> Factors:
    """Fit factors of the model folder `model` on the documents in `data` and save them to `out`.

    `out` is checked and locked before the model is loaded; the running sums checkpoint to `.<out>.checkpoint/`,
    which is deleted in the same commit that renames the finished factor folder in."""
    model, data, out = require_path("model", model), require_path("data", data), Path(require_path("out", out))
    options = require_instance("options", options or ModelOptions(), ModelOptions)
    settings = require_instance("settings", settings or FitSettings(), FitSettings)
    group.initialize()
    with output_folder(out, overwrite, {**model_folders("--model", model), "--data": data}, command="fit", lock=group.is_main()):
        check_source(data, "fitting documents")
        stage = load_stage(model, options)
        require_linear_modules(stage.tracked, "pretrace fit")
        data_hash = source_sha256(data)
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
        if group.is_main():
            factors.save(out, overwrite=True, discard=[checkpoint])
        group.barrier()
    return factors
