"""`pretrace fit`: EK-FAC factors of a model on a corpus, written atomically, resumable."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from pretrace.parallel import group
from pretrace.config import IN_MEMORY, require_instance, require_path, to_dict
from pretrace.curvature import FitSettings, Factors, fit_factors
from pretrace.errors import PretraceError
from pretrace.gradients.task import Task
from pretrace.modeling.adapters import model_folders
from pretrace.modeling.modules import require_linear_modules
from pretrace.data.records import RecordSource, check_source, in_memory, source_sha256
from pretrace.progress import note
from pretrace.storage import checkpoint_folder, output_folder
from pretrace.modeling.memory import budget_bytes, fit_plan, plan_run
from pretrace.modeling.stage import ModelOptions, Stage, load_stage


def fit(model: str | Path | Stage, data: RecordSource, out: str | Path | None = None, options: ModelOptions | None = None,
        settings: FitSettings | None = None, overwrite: bool = False, progress: bool = True, task: Task | None = None) -> Factors:
    """Fit factors of `model` (a model folder loaded with `options`, or the `Stage` of a loaded model) on `data`
    (documents, or fine-tuning pairs: a path or records in memory) and save them to `out` when given.

    `out` is checked and locked before the model is loaded; the running sums checkpoint to `.<out>.checkpoint/`,
    which is deleted in the same commit that renames the finished factor folder in. `task`: what the curvature is of
    (default: the language-modelling loss)."""
    options = require_instance("options", options or ModelOptions(), ModelOptions)
    settings = require_instance("settings", settings or FitSettings(), FitSettings)
    model_name = IN_MEMORY if isinstance(model, Stage) else require_path("model", model)
    data_name = IN_MEMORY if in_memory(data) else require_path("data", data)
    if out is None and overwrite:
        raise PretraceError("--overwrite has no effect without an output folder (out=None: nothing is written); drop it.")
    group.initialize()
    inputs = {flag: path for flag, path in {**model_folders("--model", model_name), "--data": data_name}.items() if path != IN_MEMORY}
    folder = nullcontext() if out is None else output_folder(Path(require_path("out", out)), overwrite, inputs, command="fit", lock=group.is_main())
    with folder:
        check_source(data, "fitting documents")
        options, plan = plan_run(None if isinstance(model, Stage) else model, options if not isinstance(model, Stage) else model.options,
                                 lambda shapes, batch, length: fit_plan(shapes, batch, length, settings.factor_dtype),
                                 model=model.model if isinstance(model, Stage) else None)
        if plan is not None and progress:
            note(plan.describe())
        # half of what the plan leaves of the budget (taken before the weights load; shared by this machine's ranks)
        keep_bytes = 0 if plan is None else max(0, budget_bytes(options) - plan.total) // (2 * group.local_world_size())
        stage = model if isinstance(model, Stage) else load_stage(model, options)
        require_linear_modules(stage.tracked, "pretrace fit")
        data_hash = source_sha256(data)
        signature = {"model_fingerprint": stage.fingerprint, "data_sha256": data_hash, "options": to_dict(stage.options if isinstance(model, Stage) else options),
                     **({} if task is None else {"task": f"{type(task).__module__}.{type(task).__qualname__}"})}
        checkpoint = None if out is None else checkpoint_folder(Path(out))
        factors = fit_factors(
            stage.model, stage.tracked, stage.fitting_batches(data), settings, task=task,
            num_batches=stage.document_batch_count(data), checkpoint_dir=checkpoint, signature=signature, progress=progress,
            keep_bytes=keep_bytes,
        )
        factors.metadata.update({
            "model": model_name if model_name == IN_MEMORY else str(Path(model_name).resolve()),
            "model_fingerprint": stage.fingerprint,
            "model_type": getattr(stage.model.config, "model_type", None),
            "data": data_name if data_name == IN_MEMORY else str(Path(data_name).resolve()),
            "data_sha256": data_hash,
            "options": signature["options"],
            **({"memory_plan": plan.prediction()} if plan is not None else {}),  # the measured peak is printed: factors stay reproducible
        })
        if out is not None and group.is_main():
            factors.save(out, overwrite=True, discard=[checkpoint])
        group.barrier()
        if plan is not None and progress:
            note(plan.report())
    return factors
