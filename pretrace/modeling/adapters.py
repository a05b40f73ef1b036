"""PEFT adapter folders (LoRA and the other PEFT methods) as models.

By default an adapter is merged into its base: influence is then over the full fine-tuned weights, which is
what multi-stage influence needs (H_ft and the query gradient live in the same parameter space as H_pt) and
gives exactly the scores of the merged model saved as a folder. Unmerged (`ADAPTER_PARAMETERS`), only the
adapter's own low-rank matrices are tracked, the single-stage question "which documents moved the adapter".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrace.errors import PretraceError
from pretrace.extras import require
from pretrace.modeling.folders import ADAPTER_CONFIG, check_model_dir, is_adapter_folder
from pretrace.settings.model import ADAPTER_MODES, ADAPTER_PARAMETERS, MERGED

ADAPTER_MODULES = r"\.lora_(A|B)\."  # the LoRA matrices inside PEFT's wrapped linear modules



def model_folders(flag: str, path: str | Path | None, base: str | Path | None = None) -> dict[str, str | Path | None]:
    """The folders a model flag makes a run read: the folder itself and, for an adapter, its base model folder,
    which is as much an input (an output must never replace it) as the adapter."""
    folders: dict[str, str | Path | None] = {flag: path}
    if path is not None and is_adapter_folder(path):
        try:
            folders[f"{flag} (the adapter's base model)"] = adapter_base(path, base)
        except PretraceError:
            pass  # no base found: loading the model says so, before any work
    return folders


def adapter_base(path: str | Path, fallback: str | Path | None = None) -> Path:
    """The base model folder: the one the adapter records, when it is a local folder, else `fallback`
    (--pretrained: an adapter trained from a hub name records that name)."""
    try:
        recorded = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise PretraceError(f"{path}/{ADAPTER_CONFIG}: unreadable ({exc.__class__.__name__}: {exc}); save the adapter again.") from None
    if recorded and (Path(recorded) / "config.json").is_file():
        return Path(recorded)
    if fallback is not None:
        return Path(fallback)
    if recorded:  # a hub name: fetched when online, refused with how to pass a folder when not
        try:
            return check_model_dir(recorded)
        except PretraceError as exc:
            raise PretraceError(f"{path}: its base model {recorded!r} is not a local model folder ({exc}); "
                                "or pass the base model folder as --pretrained.") from None
    raise PretraceError(f"{path}: the adapter names no base model; pass the base model folder as --pretrained.")


def _peft():
    require("peft", purpose="a PEFT adapter folder")
    import peft

    return peft


def load_adapter_model(path: str | Path, base_model: torch.nn.Module, mode: str = MERGED) -> torch.nn.Module:
    """`base_model` (loaded and checked like any model) with the adapter in `path` applied: merged into plain
    weights, or kept as a PEFT model whose adapter matrices alone can be tracked."""
    if mode not in ADAPTER_MODES:
        raise PretraceError(f"unknown adapter mode {mode!r}; choose one of {list(ADAPTER_MODES)}.")
    peft = _peft()
    try:
        model = peft.PeftModel.from_pretrained(base_model, str(path), is_trainable=mode == ADAPTER_PARAMETERS)
    except Exception as exc:  # a mismatched base raises shape errors deep inside PEFT
        raise PretraceError(f"{path}: could not apply the adapter to its base ({exc.__class__.__name__}: {exc}); "
                            "is --pretrained the model it was trained from?") from None
    return (model.merge_and_unload() if mode == MERGED else model).eval()
